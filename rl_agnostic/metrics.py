"""Run metrics for the Ray dashboard and Prometheus (``ray.util.metrics``).

Every trainer publishes a few gauges, tagged with the run name and, where it applies, the env or
dataset. Ray exports them on each node's metrics port (``ray start --metrics-export-port`` or
``ray.init(_metrics_export_port=...)``) with the ``ray_`` prefix, e.g.
``ray_rl_agnostic_episode_return{run="quickstart",env_id="CartPole-v1"}``; the dashboard's
Metrics view and any Prometheus scraping the cluster show them.

    rl_agnostic_episode_return         online: mean training return per env     (run, env_id)
    rl_agnostic_env_steps_per_s        online: sampled env steps per second     (run)
    rl_agnostic_learner_samples_per_s  online: samples the learner trained on/s (run)
    rl_agnostic_grad_steps_per_s       offline: gradient steps per second       (run)
    rl_agnostic_data_wait_fraction     offline: share of step time spent waiting for data (run)
    rl_agnostic_normalized_score       offline: latest evaluation per dataset   (run, dataset)
"""

from __future__ import annotations

from collections.abc import Mapping

GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "rl_agnostic_episode_return": ("Mean training episode return per env type.",
                                   ("run", "env_id")),
    "rl_agnostic_env_steps_per_s": ("Env steps sampled per second.", ("run",)),
    "rl_agnostic_learner_samples_per_s": ("Samples trained on per second by the learners.",
                                          ("run",)),
    "rl_agnostic_grad_steps_per_s": ("Offline gradient steps per second.", ("run",)),
    "rl_agnostic_data_wait_fraction": ("Share of offline step time spent fetching minibatches.",
                                       ("run",)),
    "rl_agnostic_normalized_score": ("Latest evaluation score per dataset, normalized 0-100.",
                                     ("run", "dataset")),
}


class RunMetrics:
    """The gauges of one run. Works in the driver and in Ray workers; a no-op outside Ray."""

    def __init__(self, run: str) -> None:
        import ray

        self.run = run
        self._gauges = {}
        if not ray.is_initialized():
            return
        from ray.util.metrics import Gauge

        for name, (doc, tags) in GAUGES.items():
            self._gauges[name] = Gauge(name, description=doc, tag_keys=tags)

    def set(self, name: str, value: float | None, **tags: str) -> None:
        gauge = self._gauges.get(name)
        if gauge is not None and value is not None:
            gauge.set(float(value), tags={"run": self.run, **tags})

    def set_per(self, name: str, values: Mapping[str, float], tag: str) -> None:
        """One value per env or dataset: ``set_per("…_episode_return", returns, "env_id")``."""
        for key, value in values.items():
            self.set(name, value, **{tag: key})
