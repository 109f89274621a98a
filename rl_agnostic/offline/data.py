"""Offline datasets: readers for D4RL HDF5, Minari and flat-transition parquet, one in-memory
schema, validation, and the conversion to a Ray Dataset.

Every reader returns a `TransitionData` (numpy, vectorized conversion; no per-row Python):

    observations       float32 (N, obs_dim)
    actions            float32 (N, act_dim) continuous, int64 (N,) discrete
    rewards            float32 (N,)
    next_observations  float32 (N, obs_dim)
    terminals          float32 (N,)   1 where the episode ended in a terminal state (no bootstrap)

plus `DatasetInfo` (env id, reference scores). `to_ray_dataset` turns it into a Ray Dataset with
one tensor column per field; the DD-IQL workers read their shards of it.

D4RL layout (``qlearning_dataset`` semantics): ``observations, actions, rewards, terminals,
timeouts`` and optionally ``next_observations``. Without ``next_observations`` the next
observation is row i+1, and rows where ``timeouts[i]`` is set (the last step of a time-limited
episode, whose successor belongs to the next episode) are dropped, as is the final row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rl_agnostic.envs.spec import EnvSpec

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")
PARQUET_METADATA_KEY = b"rl_agnostic"
D4RL_KEYS = ("observations", "actions", "rewards", "terminals")

# D4RL reference returns (d4rl/infos.py): normalized = 100·(score − min)/(max − min).
D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "pen": (96.262799, 3076.8331),
    "door": (-56.512833, 2880.5693),
    "hammer": (-274.856578, 12794.134825),
    "relocate": (-6.425911, 4233.877797),
}


class DatasetError(ValueError):
    """A dataset is missing, malformed or inconsistent; the message names the file and field."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset says about itself, beyond its arrays."""

    name: str
    """Short name used in metrics and results (``hopper-expert``)."""
    env_id: str | None = None
    """Environment the data comes from (and where the policy is evaluated), if recorded."""
    ref_min_score: float | None = None
    """Return that normalizes to 0 (a random policy's mean return)."""
    ref_max_score: float | None = None
    """Return that normalizes to 100 (the expert / best behaviour policy's mean return)."""
    source: str = ""
    """Where it was read from (path or Minari id)."""
    num_episodes: int | None = None
    """Episodes in the data, when known."""

    def normalized(self, score: float) -> float | None:
        """100·(score − min)/(max − min); None without reference scores or when max ≤ min
        (e.g. data of a policy no better than random: the ratio would be meaningless)."""
        if self.ref_min_score is None or self.ref_max_score is None \
                or self.ref_max_score <= self.ref_min_score:
            return None
        return 100.0 * (score - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)


@dataclass
class TransitionData:
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in FIELDS}


def _transitions(arrays: dict[str, np.ndarray], info: DatasetInfo) -> TransitionData:
    obs = np.asarray(arrays["observations"], np.float32)
    nxt = np.asarray(arrays["next_observations"], np.float32)
    obs = obs.reshape(len(obs), -1)
    nxt = nxt.reshape(len(nxt), -1)
    actions = np.asarray(arrays["actions"])
    if np.issubdtype(actions.dtype, np.integer):
        actions = actions.astype(np.int64).reshape(-1)
    else:
        actions = actions.astype(np.float32).reshape(len(actions), -1)
    data = TransitionData(obs, actions, np.asarray(arrays["rewards"], np.float32).reshape(-1), nxt,
                          np.asarray(arrays["terminals"], np.float32).reshape(-1), info)
    check_arrays(data)
    return data


def check_arrays(data: TransitionData) -> None:
    """Shapes agree and every value is finite; `DatasetError` naming the field otherwise."""
    where = data.info.source or data.info.name
    n = len(data.observations)
    if n == 0:
        raise DatasetError(f"{where}: the dataset holds no transitions")
    for f in FIELDS:
        if len(getattr(data, f)) != n:
            raise DatasetError(f"{where}: {f} has {len(getattr(data, f))} rows, observations {n}")
    if data.next_observations.shape != data.observations.shape:
        raise DatasetError(f"{where}: next_observations shape {data.next_observations.shape} "
                           f"differs from observations shape {data.observations.shape}")
    for f in FIELDS:
        arr = getattr(data, f)
        if arr.dtype.kind == "f":
            bad = ~np.isfinite(arr)
            if bad.any():
                rows = np.unique(np.nonzero(bad)[0])
                raise DatasetError(f"{where}: {f} holds {int(bad.sum())} NaN/inf values in "
                                   f"{len(rows)} rows (first row {int(rows[0])})")


def check_against_spec(data: TransitionData, spec: EnvSpec) -> TransitionData:
    """Check the data fits the environment's spaces; continuous actions are returned mapped to
    [-1, 1] (the networks' action space, as online), discrete ones as indices."""
    where = data.info.source or data.info.name
    if data.obs_dim != spec.obs_dim:
        raise DatasetError(f"{where}: observations have {data.obs_dim} values but {spec.env_id} "
                           f"observes {spec.obs_dim}")
    if spec.is_discrete:
        a = data.actions
        if a.dtype.kind == "f":
            if a.ndim != 1 and a.shape[1] != 1 or not np.all(a == np.round(a)):
                raise DatasetError(f"{where}: {spec.env_id} has {spec.action_dim} discrete "
                                   f"actions but the dataset's actions are float vectors of "
                                   f"shape {a.shape}")
            a = a.reshape(-1).astype(np.int64)
        if a.min() < 0 or a.max() >= spec.action_dim:
            raise DatasetError(f"{where}: discrete actions must lie in [0, {spec.action_dim}) for "
                               f"{spec.env_id}; found [{a.min()}, {a.max()}]")
        return dataclasses.replace(data, actions=a)
    if data.actions.dtype.kind != "f" or data.actions.ndim != 2 \
            or data.actions.shape[1] != spec.action_dim:
        raise DatasetError(f"{where}: {spec.env_id} takes continuous actions of length "
                           f"{spec.action_dim}; the dataset's actions have shape "
                           f"{data.actions.shape} ({data.actions.dtype})")
    return dataclasses.replace(data, actions=normalize_actions(data.actions, spec))


def normalize_actions(actions: np.ndarray, spec: EnvSpec) -> np.ndarray:
    """Env bounds → [-1, 1] (inverse of `rl_agnostic.online.agent.to_env_action`), clipped."""
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
    bounded = np.isfinite(low) & np.isfinite(high)
    scaled = np.where(bounded, 2.0 * (actions - low) / np.where(bounded, high - low, 1.0) - 1.0,
                      actions)
    return np.where(bounded, np.clip(scaled, -1.0, 1.0), scaled).astype(np.float32)


# -- D4RL HDF5 --------------------------------------------------------------------------------
def d4rl_task(name: str) -> str | None:
    """The D4RL task (``hopper``) that names a file like ``hopper-medium-v2.hdf5``, if any."""
    stem = Path(name).name.lower()
    for task in D4RL_REF_SCORES:
        if stem.startswith(task + "-") or stem.startswith(task + "_"):
            return task
    return None


def read_d4rl_hdf5(path: str | Path, name: str | None = None) -> TransitionData:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"D4RL file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(f"{path} is not a readable HDF5 file: {exc}") from None
    with f:
        missing = [k for k in D4RL_KEYS if k not in f]
        if missing:
            raise DatasetError(f"{path}: missing D4RL keys {missing} (found {sorted(f.keys())})")
        raw = {k: f[k][()] for k in (*D4RL_KEYS, "timeouts", "next_observations") if k in f}
        attrs = dict(f.attrs)
    n = len(raw["observations"])
    timeouts = raw.get("timeouts", np.zeros(n, bool)).astype(bool).reshape(-1)
    for key, arr in (*raw.items(), ("timeouts", timeouts)):
        if len(arr) != n:
            raise DatasetError(f"{path}: {key} has {len(arr)} rows, observations {n}")
    if "next_observations" in raw:
        arrays = {k: raw[k] for k in FIELDS}
        if arrays["next_observations"].shape != arrays["observations"].shape:
            raise DatasetError(f"{path}: next_observations shape {arrays['next_observations'].shape}"
                               f" differs from observations shape {arrays['observations'].shape}")
    else:
        keep = np.nonzero(~timeouts[:-1])[0]
        arrays = {k: raw[k][keep] for k in D4RL_KEYS}
        arrays["next_observations"] = raw["observations"][keep + 1]
    num_episodes = int(np.count_nonzero((raw["terminals"].reshape(-1) > 0) | timeouts))
    task = d4rl_task(path.name)
    ref = D4RL_REF_SCORES.get(task) if task else None
    env_id = attrs.get("env_id")
    info = DatasetInfo(name=name or path.stem, env_id=env_id.decode() if isinstance(env_id, bytes)
                       else env_id, ref_min_score=ref[0] if ref else None,
                       ref_max_score=ref[1] if ref else None, source=str(path),
                       num_episodes=num_episodes)
    return _transitions(arrays, info)


# -- Minari -----------------------------------------------------------------------------------
def read_minari(source: str | Path, name: str | None = None) -> TransitionData:
    """A local Minari dataset: its id (under ``MINARI_DATASETS_PATH``) or its directory."""
    import minari
    from minari.dataset.minari_dataset import MinariDataset

    path = Path(source)
    try:
        if path.is_dir():
            data_dir = path / "data" if (path / "data").is_dir() else path
            dataset = MinariDataset(data_dir)
        else:
            dataset = minari.load_dataset(str(source), download=False)
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise DatasetError(f"Minari dataset {str(source)!r} cannot be loaded (no download is "
                           f"attempted): {exc}") from None
    parts: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
    num_episodes = 0
    for episode in dataset.iterate_episodes():
        obs = np.asarray(episode.observations)
        if not isinstance(episode.observations, np.ndarray):
            raise DatasetError(f"Minari dataset {source}: only flat array observations are "
                               f"supported, got {type(episode.observations).__name__}")
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(episode.actions))
        parts["rewards"].append(np.asarray(episode.rewards))
        parts["terminals"].append(np.asarray(episode.terminations))
        num_episodes += 1
    if not num_episodes:
        raise DatasetError(f"Minari dataset {source} holds no episodes")
    meta = dataset.storage.metadata
    env_spec = dataset.spec.env_spec
    dataset_id = str(meta.get("dataset_id", path.name))
    info = DatasetInfo(
        name=name or re.sub(r"-v\d+$", "", dataset_id.split("/")[-1]),
        env_id=env_spec.id if env_spec is not None else meta.get("rl_agnostic_env_id"),
        ref_min_score=_float_or_none(meta.get("ref_min_score")),
        ref_max_score=_float_or_none(meta.get("ref_max_score")),
        source=str(source), num_episodes=num_episodes)
    return _transitions({f: np.concatenate(v) for f, v in parts.items()}, info)


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(np.asarray(value).reshape(-1)[0])
    return None if math.isnan(value) else value


# -- parquet ----------------------------------------------------------------------------------
def write_parquet(data: TransitionData, path: str | Path) -> Path:
    """One row per transition; vector fields as fixed-size lists; `DatasetInfo` in the schema
    metadata. Written to a temporary name and renamed, so a reader never sees half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for f in FIELDS:
        arr = getattr(data, f)
        if arr.ndim == 2:
            columns[f] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
        else:
            columns[f] = pa.array(arr)
    table = pa.table(columns).replace_schema_metadata(
        {PARQUET_METADATA_KEY: json.dumps(dataclasses.asdict(data.info)).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_parquet(path: str | Path, name: str | None = None) -> TransitionData:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"parquet file {path} does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path} is not a readable parquet file: {exc}") from None
    missing = [f for f in FIELDS if f not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: missing columns {missing} (found {table.column_names})")
    arrays = {}
    for f in FIELDS:
        col = table.column(f).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            arrays[f] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col),
                                                                           col.type.list_size)
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            arrays[f] = np.stack(col.to_numpy(zero_copy_only=False))
        else:
            arrays[f] = col.to_numpy(zero_copy_only=False)
    meta = (table.schema.metadata or {}).get(PARQUET_METADATA_KEY)
    info = DatasetInfo(**json.loads(meta)) if meta else DatasetInfo(name=path.stem)
    info = dataclasses.replace(info, name=name or info.name, source=str(path))
    return _transitions(arrays, info)


# -- dispatch and Ray Data --------------------------------------------------------------------
FORMATS = ("d4rl", "minari", "parquet")


def detect_format(source: str) -> str:
    suffix = Path(source).suffix.lower()
    if suffix in (".hdf5", ".h5"):
        return "d4rl"
    if suffix == ".parquet":
        return "parquet"
    return "minari"


def read_dataset(source: str, fmt: str | None = None, name: str | None = None) -> TransitionData:
    """Read ``source`` as ``fmt`` (``d4rl``, ``minari``, ``parquet``; None = by extension:
    .hdf5/.h5 → d4rl, .parquet → parquet, anything else a Minari id or directory)."""
    fmt = fmt or detect_format(source)
    readers = {"d4rl": read_d4rl_hdf5, "minari": read_minari, "parquet": read_parquet}
    if fmt not in readers:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose one of {list(FORMATS)}")
    return readers[fmt](source, name=name)


def to_ray_dataset(data: TransitionData):
    """A Ray Dataset with one tensor column per field (ready for ``get_dataset_shard``)."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    columns = {}
    for f in FIELDS:
        arr = getattr(data, f)
        columns[f] = ArrowTensorArray.from_numpy(arr) if arr.ndim > 1 else pa.array(arr)
    return ray.data.from_arrow(pa.table(columns))


def shard_to_arrays(shard: Any, batch_size: int = 65536) -> dict[str, np.ndarray]:
    """Every row of a Ray Data shard (``DataIterator``) as numpy arrays, in one pass."""
    parts: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                    prefetch_batches=2):
        for f in FIELDS:
            parts[f].append(batch[f])
    if not parts["rewards"]:
        return {}
    return {f: np.concatenate(v) for f, v in parts.items()}
