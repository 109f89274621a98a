"""The paper's experiments as one command each (``rl-agnostic experiment NAME``): an experiment
file (`spec`) expands to ordinary online runs (`run`), whose curves become normalized-score tables
and plots (`report`); a ``kind: offline`` file (paper Table 1) expands to offline runs instead
(`offline`)."""

from rl_agnostic.experiments.offline import (OfflineExperiment, run_offline_experiment,
                                             write_offline_report)
from rl_agnostic.experiments.report import write_report
from rl_agnostic.experiments.run import run_experiment
from rl_agnostic.experiments.spec import Experiment, load_experiment

__all__ = ["Experiment", "OfflineExperiment", "load_experiment", "run_experiment",
           "run_offline_experiment", "write_offline_report", "write_report"]
