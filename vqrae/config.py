"""Config loading shared by every entry point.

Defaults live in one place: the dataclass of each component (``EncoderConfig`` in ``encoder.py``,
``QuantizerConfig`` in ``quantizer.py``, ...). A YAML file holds only what differs from them and may name
another YAML it extends with ``inherit: other.yaml`` (relative to the file). Dotted command-line overrides
(``optim.lr=1e-4``) are merged last. An unknown key or a value of the wrong type is a ``ConfigError`` with
a one-line message naming the valid keys.
"""
from __future__ import annotations

import os
from typing import Any, Sequence, Type, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message is one line."""


def _valid_keys(schema: DictConfig, full_key: str) -> list[str]:
    node: Any = schema
    for part in [p for p in (full_key or "").split(".")[:-1] if p]:
        try:
            node = node[part]
        except Exception:
            return []
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _one_line(err: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        valid = _valid_keys(schema, key)
        return ConfigError(f"unknown config key '{key}' ({source}); valid keys here: {', '.join(valid)}")
    return ConfigError(f"bad value for config key '{key}' ({source}): {msg}")


def _read_yaml(path: str, seen: tuple[str, ...] = ()) -> DictConfig:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config files inherit from each other in a loop: {' -> '.join(seen + (path,))}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors carry multi-line context
        raise ConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    parent = node.pop("inherit", None)
    if parent is not None:
        base = _read_yaml(os.path.join(os.path.dirname(path), str(parent)), seen + (path,))
        node = OmegaConf.merge(base, node)
    return node


def load_config(schema_cls: Type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a ``schema_cls`` instance from its defaults, an optional YAML and dotted overrides."""
    schema = OmegaConf.structured(schema_cls)
    cfg = schema
    if path:
        node = _read_yaml(path)
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _one_line(e, schema, path) from None
    dotlists = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        try:
            dotlists.append(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _one_line(e, schema, f"override '{item}'") from None
    try:
        cfg = OmegaConf.merge(cfg, *dotlists)  # left to right, as one by one, with one copy of the config
    except OmegaConfBaseException:
        for item, dotlist in zip(overrides, dotlists):  # again one by one, to name the override that fails
            try:
                cfg = OmegaConf.merge(cfg, dotlist)
            except OmegaConfBaseException as e:
                raise _one_line(e, schema, f"override '{item}'") from None
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _one_line(e, schema, "missing value") from None
    except ValueError as e:  # a config dataclass's own __post_init__ check
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML/JSON and logging)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(schema_cls: Type[T], data: dict) -> T:
    """Rebuild a config dataclass from ``to_dict`` output, with the same checks as ``load_config``."""
    schema = OmegaConf.structured(schema_cls)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, data))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _one_line(e, schema, "saved config") from None


def save_yaml(cfg: Any, path: str) -> None:
    with open(path, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
