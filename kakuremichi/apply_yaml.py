"""Reading ``kakuremichi apply``'s file as YAML nodes, with errors that name the line.

The file is composed with PyYAML's safe loader into nodes, not loaded into values, so
every error can say where it is: ``kakuremichi.yaml:12: tunnels[0].agent: required``.
A scalar's value is what the safe loader would make of it (YAML 1.1); a node it has no
value for (an unknown tag) is :class:`Unreadable`, which the caller turns into a
:class:`FileError` naming its line.  Lists and mappings given as values (``plain``) are
bounded in depth and count, so a recursive or exploding alias is a file error and not a
hang.  A pydantic error (the REST API's own models check every entry) becomes a
:class:`FileError` at the line of the deepest node it names (``validation_error``).

This module knows nothing of tunnels or policies: ``kakuremichi.apply`` (the file's
entries) and ``kakuremichi.apply_access`` (its ``access:`` policies) both use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

#: bounds on values the file gives as lists and mappings (aliases can nest and multiply)
MAX_DEPTH = 8
MAX_VALUES = 20_000

#: a place in an entry: field names and list indices (``("paths", 1, "prefix")``)
Place = tuple[Any, ...]


class FileError(Exception):
    """The file cannot be applied; the message names the file, line and field."""


class Unreadable(Exception):
    """A node the safe loader has no value for (``apply.parse`` names its line)."""

    def __init__(self, node: yaml.Node, problem: str) -> None:
        super().__init__(problem)
        self.node = node
        self.problem = problem


def where(path: str, node: yaml.Node) -> str:
    """``file:line`` of a node (lines counted from 1)."""
    return f"{path}:{node.start_mark.line + 1}"


def show(value: Any) -> str:
    """A value as plans print it: ``none``, ``true``/``false``, or its text."""
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def scalar(node: yaml.Node) -> Any:
    """A scalar node's value as YAML 1.1 (PyYAML's safe loader) reads it."""
    try:
        return yaml.safe_load(yaml.serialize(node))
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "no value for this"
        raise Unreadable(node, str(problem)) from None


def mapping(path: str, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """A mapping's (key, key node, value node) in order; keys are text, each once."""
    if not isinstance(node, yaml.MappingNode):
        raise FileError(f"{where(path, node)}: {what}: expected a mapping (key: value)")
    pairs: list[tuple[str, yaml.Node, yaml.Node]] = []
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            raise FileError(f"{where(path, key_node)}: {what}: keys must be text")
        if key in seen:
            raise FileError(f"{where(path, key_node)}: {what}.{key}: given twice")
        seen.add(key)
        pairs.append((key, key_node, value_node))
    return pairs


def sequence(path: str, node: yaml.Node, what: str) -> list[yaml.Node]:
    """A list's items (nothing under the key: no items)."""
    if isinstance(node, yaml.ScalarNode) and scalar(node) is None:
        return []  # "agents:" with nothing under it
    if not isinstance(node, yaml.SequenceNode):
        raise FileError(f"{where(path, node)}: {what}: expected a list (- …)")
    return list(node.value)


def unknown(path: str, key_node: yaml.Node, what: str, key: str, allowed: tuple[str, ...]) -> None:
    """A :class:`FileError` if ``key`` is not one of ``allowed`` (which it lists)."""
    if key not in allowed:
        raise FileError(
            f"{where(path, key_node)}: {what}.{key}: unknown field (allowed: "
            f"{', '.join(a for a in allowed if a != 'publicPort')})"
        )


def fields(
    path: str,
    node: yaml.Node,
    what: str,
    allowed: tuple[str, ...],
    nested: tuple[str, ...] = (),
) -> tuple[dict[str, Any], dict[str, yaml.Node]]:
    """A mapping of single values; the ``nested`` fields' nodes are returned as they are
    (their values are left for the caller)."""
    values: dict[str, Any] = {}
    nodes: dict[str, yaml.Node] = {}
    for key, key_node, value_node in mapping(path, node, what):
        unknown(path, key_node, what, key, allowed)
        nodes[key] = value_node
        if key in nested:
            continue
        if not isinstance(value_node, yaml.ScalarNode):
            raise FileError(f"{where(path, value_node)}: {what}.{key}: expected a single value")
        values[key] = scalar(value_node)
    return values, nodes


def fields_or_name(
    path: str, node: yaml.Node, what: str, allowed: tuple[str, ...], name: str
) -> tuple[dict[str, Any], dict[str, yaml.Node]]:
    """:func:`fields`, or for a lone scalar (``- laptop`` for short) that value as
    ``name``."""
    if isinstance(node, yaml.ScalarNode):
        return {name: scalar(node)}, {name: node}
    return fields(path, node, what, allowed)


def plain(path: str, node: yaml.Node, what: str, loc: Place, nodes: dict[Place, yaml.Node]) -> Any:
    """A node's value (lists and mappings too), each node recorded under its place."""
    nodes[loc] = node
    if len(loc) > MAX_DEPTH or len(nodes) > MAX_VALUES:  # aliases can nest and multiply
        raise FileError(f"{where(path, node)}: {dotted(what, loc)}: too deep or too many values")
    if isinstance(node, yaml.SequenceNode):
        return [plain(path, item, what, (*loc, i), nodes) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        return {
            key: plain(path, value, what, (*loc, key), nodes)
            for key, _key_node, value in mapping(path, node, dotted(what, loc))
        }
    return scalar(node)


def dotted(what: str, loc: Place) -> str:
    """``tunnels[0].access`` and ``("paths", 1, "prefix")``: ``…access.paths[1].prefix``."""
    out = what
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validation_error(
    path: str,
    node: yaml.Node,
    nodes: Mapping[Place, yaml.Node],
    what: str,
    exc: ValidationError,
) -> FileError:
    """The first problem pydantic found, at the line of the deepest node it names
    (``nodes`` maps places to nodes; ``node`` is where a place not in it points)."""
    error = exc.errors(include_url=False, include_input=False)[0]
    loc = tuple("public_port" if p == "publicPort" else p for p in error.get("loc", ()))
    ends = range(len(loc), 0, -1)
    at = next((nodes[loc[:end]] for end in ends if loc[:end] in nodes), node)
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        message = "required"
    return FileError(f"{where(path, at)}: {dotted(what, loc)}: {message}")
