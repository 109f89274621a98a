"""The paper's experiments as one command each (``rl-agnostic experiment NAME``): an experiment
file (`spec`) expands to ordinary online runs (`run`), whose curves become normalized-score tables
and plots (`report`)."""

from rl_agnostic.experiments.report import write_report
from rl_agnostic.experiments.run import run_experiment
from rl_agnostic.experiments.spec import Experiment, load_experiment

__all__ = ["Experiment", "load_experiment", "run_experiment", "write_report"]
