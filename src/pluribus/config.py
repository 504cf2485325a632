"""Frozen-dataclass configs: load from TOML, write to TOML, flatten to scalars for Flower's run_config."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from pluribus.errors import ConfigError, DataError
from pluribus.io import write_text

C = TypeVar("C")

Scalar = bool | int | float | str


def config_to_dict(config: Any) -> dict[str, Any]:
    """A nested plain dict of a (possibly nested) dataclass config; tuples become lists, None is dropped."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"expected a dataclass instance, got {type(config).__name__}")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def config_from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types with the key's path."""
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{source}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None
    except ConfigError as err:  # a range check in __post_init__: say which file (or run_config) it came from
        text = str(err)
        raise ConfigError(text if text.startswith(source) else f"{source}: {text}") from None


def read_toml(path: str | Path, *, what: str = "config file") -> dict[str, Any]:
    """The TOML document at ``path``; DataError naming the file when it is missing, unreadable or malformed."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found", path=p)
    if not p.is_file():
        raise DataError(f"is a folder, expected a {what} (TOML)", path=p)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise DataError(f"malformed TOML: {err}", path=p) from None
    except (UnicodeDecodeError, OSError) as err:
        raise DataError(f"cannot read the {what}: {err}", path=p) from None


def load_config(cls: type[C], path: str | Path, *, section: str | None = None) -> C:
    """Read a TOML file (optionally one [section] of it) into config class ``cls``."""
    p = Path(path)
    data = read_toml(p)
    if section is not None:
        if section not in data:
            raise ConfigError(f"{p}: no [{section}] section; sections: {sorted(data)}")
        data = data[section]
    return config_from_dict(cls, data, source=str(p))


def save_config(config: Any, path: str | Path) -> Path:
    """Write a dataclass config as TOML, atomically."""
    return write_text(path, tomli_w.dumps(config_to_dict(config)))


def flatten_config(config: Any, prefix: str = "") -> dict[str, Scalar]:
    """Flatten a config to dotted scalar keys (lists become comma-joined strings) for Flower's run_config."""
    flat: dict[str, Scalar] = {}
    for key, value in config_to_dict(config).items() if dataclasses.is_dataclass(config) else config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif isinstance(value, list):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = value
    return flat


def unflatten_config(cls: type[C], flat: Mapping[str, Scalar]) -> C:
    """Inverse of flatten_config: rebuild config ``cls`` from dotted scalar keys."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(cls, nested, source="run_config")


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: cannot read {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(items) if v != "")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return config_from_dict(hint, value, source=where)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if math.isnan(number):  # no setting means "not a number"; inf stays (epsilon = inf turns DP off)
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def set_threads(threads: int | None, *, option: str = "--threads") -> None:
    """Use ``threads`` torch CPU threads (None: leave as is); a count below 1 raises ConfigError naming ``option``."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"{option} {threads!r}: need a whole number of threads >= 1")
    import torch  # here, not at import: `pluribus --help` must not load torch

    torch.set_num_threads(threads)
