# Two commands for a fresh clone:
#   make train  install (editable, CPU torch pin) and train ONE agent on 3 env types on a local Ray
#               (`rl-agnostic train tune_configs/quickstart.yaml`)
#   make test   install with the test extra and run the test suite
# Also: make demo (an untrained network acting in 5 env shapes).
# PYTHON=/path/to/python picks the interpreter (e.g. a venv's); TRAIN_ARGS / DEMO_ARGS /
# PYTEST_ARGS pass options on; CONFIG=tune_configs/<file>.yaml trains another config.

PYTHON ?= python3
# constraints/cpu.txt pins torch==2.13.0 (the CPU wheel) and the tested versions of the rest.
PIP_INSTALL = $(PYTHON) -m pip install -c constraints/cpu.txt
# The console script that pip installs for $(PYTHON), wherever its scripts directory is.
SCRIPTS = $$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')

# The machine is shared: keep BLAS/OpenMP to one thread unless told otherwise.
export OMP_NUM_THREADS ?= 1

CONFIG ?= tune_configs/quickstart.yaml

.PHONY: train demo test install install-test

install:
	$(PIP_INSTALL) -e .

install-test:
	$(PIP_INSTALL) -e '.[test]'

train: install
	@echo "rl-agnostic train $(CONFIG) $(TRAIN_ARGS)"
	@"$(SCRIPTS)/rl-agnostic" train $(CONFIG) $(TRAIN_ARGS)

demo: install
	@echo "rl-agnostic demo $(DEMO_ARGS)"
	@"$(SCRIPTS)/rl-agnostic" demo $(DEMO_ARGS)

# Two pytest workers (pytest-xdist), each test file on one of them so that a file's Ray
# cluster fixture starts once: the Ray tests mostly wait on actors, so two files overlap well
# on 2 cores. PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
# pytest exit 5 means it collected no test: say so loudly and pass; any other failure fails.
test: install-test
	@rc=0; $(PYTHON) -m pytest tests -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) \
		|| rc=$$?; \
	if [ $$rc -eq 5 ]; then \
		echo "make test: WARNING: pytest collected no tests (exit 5): nothing was tested"; \
		exit 0; \
	fi; \
	exit $$rc
