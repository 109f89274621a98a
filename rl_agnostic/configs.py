"""Config-file plumbing shared by the online and offline configs: YAML reading, unknown-key
errors with a suggestion, type checks of section fields, and the network presets."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from rl_agnostic.nn import NetworkConfig
from rl_agnostic.nn.config import ConfigError


def check_keys(values: dict, known: list[str], where: str) -> None:
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint} (known: {', '.join(known)})")


def section(cls: type, values: Any, where: str):
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(values, list(fields), where)
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        check_type(value, hints[key], f"{where}.{key}")
    return cls(**values)


def check_type(value: Any, hint: Any, where: str) -> None:
    allowed = typing.get_args(hint) or (hint,)
    ok = False
    for t in allowed:
        if t is type(None):
            ok |= value is None
        elif t is float:
            ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
        elif t is int:
            ok |= isinstance(value, int) and not isinstance(value, bool)
        else:
            ok |= isinstance(value, t)
    if not ok:
        names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
        raise ConfigError(f"{where} must be {names}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"{where} must be >= 0, got {value!r}")


def parse_network(value: Any, source: str) -> NetworkConfig:
    """``model.network``: a preset name (``cpu``, ``paper``) or a mapping of `NetworkConfig`
    fields, optionally with ``preset:`` to start from."""
    presets = {"cpu": NetworkConfig.cpu, "paper": NetworkConfig.paper}
    if isinstance(value, NetworkConfig):
        return value
    if isinstance(value, str):
        value = {"preset": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: model.network must be a preset name or a mapping")
    value = dict(value)
    preset = value.pop("preset", "cpu")
    if preset not in presets:
        raise ConfigError(f"{source}: model.network preset must be one of {list(presets)}, "
                          f"got {preset!r}")
    try:
        return presets[preset](**value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: model.network: {exc}") from None


def read_yaml_mapping(path: str | Path) -> Any:
    """The parsed YAML of ``path``; unreadable files and invalid YAML raise `ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {exc}") from None


def check_top_level(cls: type, values: Any, source: str, required: tuple[str, ...]) -> str:
    """The checks every run config's top level shares: a mapping of known keys holding the
    ``required`` ones, and a ``name`` usable as a directory name. Returns the name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(values).__name__}")
    check_keys(values, [f.name for f in dataclasses.fields(cls)], source)
    for key in required:
        if key not in values:
            raise ConfigError(f"{source}: missing required key {key!r}")
    name = values["name"]
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{source}: name must be a non-empty string without '/', got {name!r}")
    return name


def parse_model(values: Any, source: str, kinds: tuple[str, ...], default_network: Any,
                count: int, what: str) -> dict[str, Any]:
    """The ``model`` section: ``kind`` (one of ``kinds``; ``single`` needs ``count`` == 1 of
    ``what``) and ``network`` (`parse_network`, ``default_network`` when absent)."""
    model = dict(values or {})
    check_keys(model, ["kind", "network"], f"{source}: model")
    model["network"] = parse_network(model.get("network", default_network), source)
    kind = model.setdefault("kind", "agnostic")
    if kind not in kinds:
        raise ConfigError(f"{source}: model.kind must be one of {list(kinds)}, got {kind!r}")
    if kind == "single" and count != 1:
        raise ConfigError(f"{source}: model.kind 'single' needs exactly one {what}, got {count}")
    return model


class SectionedConfig:
    """``to_dict`` and ``replace`` for run configs made of sections: a list section named
    ``LIST_SECTION`` (envs or datasets), a ``model`` with a `NetworkConfig`, and plain ones."""

    LIST_SECTION = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d[self.LIST_SECTION] = [dataclasses.asdict(e) for e in getattr(self, self.LIST_SECTION)]
        d["model"]["network"] = self.model.network.to_dict()
        return d

    @classmethod
    def from_dict(cls, values: Any, source: str = "config") -> Any:
        raise NotImplementedError

    def replace(self, **sections: Any) -> Any:
        """Copy with whole sections or section fields replaced: ``replace(run={"seed": 1})``."""
        values = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
        return type(self).from_dict(values)
