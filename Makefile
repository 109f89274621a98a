# Two commands for a fresh clone:
#   make demo   install (editable, CPU torch pin) and run `rl-agnostic demo`
#   make test   install with the test extra and run the test suite
# PYTHON=/path/to/python picks the interpreter (e.g. a venv's); DEMO_ARGS / PYTEST_ARGS pass options on.

PYTHON ?= python3
# constraints/cpu.txt pins torch==2.13.0 (the CPU wheel) and the tested versions of the rest.
PIP_INSTALL = $(PYTHON) -m pip install -c constraints/cpu.txt
# The console script that pip installs for $(PYTHON), wherever its scripts directory is.
SCRIPTS = $$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')

# The machine is shared: keep BLAS/OpenMP to one thread unless told otherwise.
export OMP_NUM_THREADS ?= 1

.PHONY: demo test install install-test

install:
	$(PIP_INSTALL) -e .

install-test:
	$(PIP_INSTALL) -e '.[test]'

demo: install
	@echo "rl-agnostic demo $(DEMO_ARGS)"
	@"$(SCRIPTS)/rl-agnostic" demo $(DEMO_ARGS)

# pytest exit 5 means it collected no test: say so loudly and pass; any other failure fails.
test: install-test
	@rc=0; $(PYTHON) -m pytest tests -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
		echo "make test: WARNING: pytest collected no tests (exit 5): nothing was tested"; \
		exit 0; \
	fi; \
	exit $$rc
