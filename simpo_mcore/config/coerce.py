"""A YAML tree -> the typed dataclasses of :mod:`simpo_mcore.config.schema`.

Every unknown key is reported at once, each with the key it most likely meant: a close spelling in its section
(``train.max_step`` -> ``train.max_steps``), the same name in another section (``train.lr`` -> ``optim.lr``) or
the name another trainer gives it (``learning_rate`` -> ``optim.lr``, :data:`foreign.MAPPED`). Values are checked
against the annotations; messages show a value in at most :data:`SHOWN_CHARS` characters, whatever its size.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from simpo_mcore.config.errors import ConfigError
from simpo_mcore.config.foreign import MAPPED
from simpo_mcore.config.schema import RunConfig, field_types

SHOWN_CHARS = 80
"""The longest a value is shown in an error message (a chat template or a huge list stays one short line)."""


def brief(value: Any) -> str:
    """``repr(value)`` on one line, cut to :data:`SHOWN_CHARS` (containers are cut before they are printed)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def build_config(tree: dict[str, Any]) -> RunConfig:
    """The :class:`RunConfig` of a YAML tree; unknown keys (all of them, with suggestions) and wrong types are
    :class:`ConfigError`. Validation of the values is the caller's (:func:`validation.validate`)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"config: expected a mapping, got {brief(tree)}")
    unknown = unknown_keys(RunConfig, tree, "")
    if unknown:
        raise ConfigError(unknown_keys_message(unknown))
    return _build(RunConfig, tree, "")


def unknown_keys(cls, tree: dict[str, Any], prefix: str) -> list[str]:
    """The dotted names of every key of ``tree`` that ``cls`` (and its sections, recursively) does not have."""
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in hints:
            out.append(name)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            out.extend(unknown_keys(hints[key], value, f"{name}."))
    return out


def unknown_keys_message(unknown: list[str]) -> str:
    known = list(field_types())
    parts = [f"{name} ({suggestion(name, known)})" for name in unknown]
    head = "unknown config key " if len(unknown) == 1 else f"{len(unknown)} unknown config keys: "
    foreign = sum(name.rsplit(".", 1)[-1] in MAPPED for name in unknown)
    tail = ("; a TRL / SimPO-repo config? simpo-import-config converts one (docs/migrating.md)"
            if foreign >= 2 else "")
    return head + ", ".join(parts) + tail


def suggestion(name: str, known: list[str]) -> str:
    """What ``name`` most likely meant, as the words in the parentheses after it."""
    section, _, leaf = name.rpartition(".")
    if leaf in MAPPED:
        mapped = MAPPED[leaf]
        how = f": {mapped.how}" if mapped.how else ""
        return f"another trainer's name: here {mapped.target}{how}"
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"did you mean {section + '.' if section else ''}{close[0]}?"
    elsewhere = [k for k in known if k.rpartition(".")[2] == leaf]
    if not elsewhere:
        leaves = {k.rpartition(".")[2]: k for k in known}
        elsewhere = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)]
    if elsewhere:
        return f"did you mean {elsewhere[0]}?"
    return f"no close match; the keys of {section or 'the config'}: {', '.join(sorted(siblings))}"


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {brief(data)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, name)
        else:
            kwargs[key] = coerce(value, tp, name)
    return cls(**kwargs)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce_union(value: Any, tp: Any, name: str) -> Any:
    options = typing.get_args(tp)
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return coerce(value, option, name)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {brief(value)} is not a {_type_name(tp)}")


def _coerce_scalar(value: Any, tp: Any, name: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {brief(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {brief(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {brief(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {brief(value)}")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp}")


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, name)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{name}: {brief(value)} is not one of {list(allowed)}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):  # one name, as `key=name` on the command line gives it
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {brief(value)}")
        return [coerce(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {brief(value)}")
        return {coerce(k, key_type, name): coerce(v, value_type, f"{name}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, tp, name)
