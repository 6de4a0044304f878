"""Dependencies run one way (STYLE.md 13): what the HTTP-at-L4 change promised, checked
on the source.  netstack imports none of our other packages; the shared data-path
layer ``kakuremichi.relay`` imports neither the programs nor the CLI; the agent imports
nothing from the gateway (what both use lives in ``kakuremichi.relay``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every module a package's files import (absolute names; relative ones resolved)."""
    found: dict[str, set[str]] = {}
    base = ROOT.joinpath(*package.split("."))
    for path in sorted(base.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names: set[str] = set()
        rel = path.relative_to(ROOT).with_suffix("")
        here = ".".join(rel.parts[:-1])
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    names.add(f"{parent}.{node.module}" if node.module else parent)
                elif node.module:
                    names.add(node.module)
        found[str(rel)] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("netstack", ("kakuremichi", "control", "gateway", "agent")),
        (
            "kakuremichi.relay",
            ("control", "gateway", "agent", "kakuremichi.cli", "kakuremichi.demo"),
        ),
        ("agent", ("gateway", "control")),
    ],
)
def test_no_import_goes_up(package: str, forbidden: tuple[str, ...]) -> None:
    offending = {
        module: sorted(
            name for name in names if any(name == f or name.startswith(f + ".") for f in forbidden)
        )
        for module, names in imported_modules(package).items()
    }
    assert {m: n for m, n in offending.items() if n} == {}


def test_the_checker_sees_imports() -> None:
    # relative imports are resolved, absolute ones kept: a checker blind to either
    # would pass the test above vacuously
    assert (
        "kakuremichi.relay.splice"
        in imported_modules("kakuremichi.relay")["kakuremichi/relay/pipe"]
    )
    agent = imported_modules("agent")["agent/forward"]
    assert {"kakuremichi.relay.pipe", "netstack.aio"} <= agent
