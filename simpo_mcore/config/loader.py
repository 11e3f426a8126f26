"""Loading a run config: a YAML file (and the files its ``_base_`` names), then dotted ``key=value`` overrides,
then types (:mod:`coerce`) and rules (:mod:`validation`). Every problem is one :class:`ConfigError` line naming the
file or key: a file that is missing, a directory, unreadable, not UTF-8 or not YAML; a ``_base_`` that is not a
file name; YAML whose aliases expand past :data:`MAX_YAML_VALUES`; an override value that is not YAML.

Override values: a string field (a path, ``output_dir``, ``data.chat_template``, a choice such as
``loss.type``) takes the text after ``=`` as it is, not read as YAML, so a Jinja template or a path with ``:``
or ``#`` needs no quoting; ``null``, ``~`` or nothing after ``=`` is null (an optional field's "unset"), and one
pair of surrounding YAML quotes is removed (``'null'`` is the text null). Every other field (numbers, true/false,
lists, mappings) reads the text as YAML.
"""

from __future__ import annotations

import json
import shlex
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from simpo_mcore.config.coerce import SHOWN_CHARS, brief, build_config
from simpo_mcore.config.errors import ConfigError
from simpo_mcore.config.schema import RunConfig, field_types
from simpo_mcore.config.validation import validate

BASE_KEY = "_base_"
"""A YAML may name files (relative to itself) that it extends, merged in order, then itself:
``_base_: ../common.yaml`` or ``_base_: [row.yaml, _8gpu.yaml]``."""

MAX_YAML_VALUES = 10_000
"""The most values (mappings, lists and scalars, counted with every alias expanded) one YAML document may hold.
A run config holds a few hundred; a YAML alias bomb ("billion laughs") holds 10^9 in a few lines, and is
refused before it is expanded."""

NULL_TEXTS = ("", "null", "~")
"""Override texts that mean null for a string field."""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (or none: all defaults), apply dotted overrides, type-check and validate."""
    tree: dict[str, Any] = read_yaml_tree(path) if path is not None else {}
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return validate(build_config(tree))


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of ``path`` with its ``_base_`` chain merged in (child keys win)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config file {path} includes itself through {BASE_KEY}")
    tree = safe_yaml(read_text(path), f"config file {path}") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    bases = tree.pop(BASE_KEY, None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"config file {path}: {BASE_KEY} must be a file name or a list of file names "
                          f"(relative to the file), got {brief(bases)}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, read_yaml_tree(path.parent / base, (*_seen, path)))
    return _merge(merged, tree)


def read_text(path: Path) -> str:
    """The text of a config file; a directory, a missing or unreadable file, or bytes that are not UTF-8 are a
    :class:`ConfigError` naming it."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a YAML file")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                          "save it as UTF-8") from exc


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``, refusing (one line naming ``where``) text that is not YAML and documents whose
    aliases expand past :data:`MAX_YAML_VALUES` values or refer to themselves, before anything is expanded."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_values(node, where, {}, set())
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {yaml_problem(exc)}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{where}: YAML nested too deeply") from exc
    finally:
        loader.dispose()


def _count_values(node: yaml.Node, where: str, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The values under ``node`` with aliases expanded, computed once per node (an alias is the same node)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError(f"{where}: a YAML alias refers to a value that contains it")
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    total = 1 + sum(_count_values(child, where, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    if total > MAX_YAML_VALUES:
        raise ConfigError(f"{where}: more than {MAX_YAML_VALUES} values once its YAML aliases are expanded "
                          "(an alias bomb?); a run config holds a few hundred")
    sizes[key] = total
    return total


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what and where (line and column, 1-based)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.seed=3", "model.checkpoint=ckpt"]`` -> ``[(key, value), ...]``: string fields take the text as
    it is, the others read it as YAML (the module's docstring)."""
    types_by_key = field_types()
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {brief(item)} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parsed.append((key, _override_value(key, raw, _annotation(key, types_by_key))))
    return parsed


def _annotation(key: str, types_by_key: dict[str, Any]) -> Any:
    """The annotation of ``key``; for a key inside a mapping field (``data.columns.prompt``) its values'."""
    if key in types_by_key:
        return types_by_key[key]
    parent = key.rpartition(".")[0]
    if typing.get_origin(types_by_key.get(parent)) is dict:
        return typing.get_args(types_by_key[parent])[1]
    return None


def _is_text(tp: Any) -> bool:
    """A field whose values are text: ``str``, an optional ``str``, or a choice among strings."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return all(_is_text(t) for t in typing.get_args(tp) if t is not type(None))
    if typing.get_origin(tp) is Literal:
        return all(isinstance(v, str) for v in typing.get_args(tp))
    return tp is str


def _override_value(key: str, raw: str, tp: Any) -> Any:
    if _is_text(tp):
        text = raw.strip()
        if text in NULL_TEXTS:
            return None
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                unquoted = yaml.safe_load(text)
            except yaml.YAMLError:
                return raw
            return unquoted if isinstance(unquoted, str) else raw
        return raw
    if raw == "":
        return None
    try:
        return safe_yaml(raw, f"override {key}")
    except ConfigError as exc:
        if not isinstance(exc.__cause__, yaml.YAMLError):
            raise
        if tp is None:  # an unknown key: its name is the error, reported with the others
            return raw
        raise ConfigError(_not_yaml_message(key, raw, tp, exc.__cause__)) from None


def _not_yaml_message(key: str, raw: str, tp: Any, exc: yaml.YAMLError) -> str:
    problem = yaml_problem(exc).replace("line 1, ", "")
    shown = raw.replace("\n", " ")
    shown = shown if len(shown) <= SHOWN_CHARS else shown[:SHOWN_CHARS - 3] + "..."
    quoted = shlex.quote(f"{key}={json.dumps(raw)}")
    return (f"override {key}={shown}: the value is not YAML ({problem}); {key} takes {_expected(tp)} written in "
            f"YAML; to pass it as text, quote it for YAML inside the shell's quotes: {quoted}")


def _expected(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if t is type(None) else _expected(t) for t in typing.get_args(tp))
    if origin is list:
        return "a list such as [a, b]"
    if origin is dict:
        return "a mapping such as {a: b}"
    return names.get(tp, "a section mapping")
