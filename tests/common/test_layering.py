"""Dependencies run one way (STYLE.md 13, issue 14 item 5), checked on the source:

    netstack  ←  common  ←  control, gateway, agent  ←  kakuremichi (CLI, demo)

``netstack`` imports none of our other packages; ``common`` (the protocol schema, the
Control client, configuration, logging and the data-path relay) imports none of the
programs or the CLI; the programs import nothing from the CLI above them nor from
each other (what the gateway and the agent both use lives in ``common.relay``)."""

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


PROGRAMS = ("control", "gateway", "agent")


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("netstack", ("common", "kakuremichi", *PROGRAMS)),
        ("common", ("kakuremichi", *PROGRAMS)),
        ("control", ("kakuremichi", "gateway", "agent")),
        ("gateway", ("kakuremichi", "control", "agent")),
        ("agent", ("kakuremichi", "control", "gateway")),
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
    assert "common.relay.splice" in imported_modules("common.relay")["common/relay/pipe"]
    agent = imported_modules("agent")["agent/forward"]
    assert {"common.relay.pipe", "netstack.aio"} <= agent


PACKAGES = ("netstack", "common", *PROGRAMS, "kakuremichi")


def module_graph() -> dict[str, set[str]]:
    """Our modules and the ones of ours each imports at run time: ``from a import b``
    counts as an import of ``a.b`` when that is a module, imports under
    ``if TYPE_CHECKING:`` do not count (they never run), imports inside functions do."""
    paths: dict[str, Path] = {}
    for package in PACKAGES:
        for path in ROOT.joinpath(package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            paths[name.removesuffix(".__init__")] = path
        for path in ROOT.joinpath(package).rglob("*.pyx"):  # compiled: a leaf here
            paths.setdefault(".".join(path.relative_to(ROOT).with_suffix("").parts), path)
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        graph[name] = set()
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        skipped = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{parent}.{node.module}" if node.module else parent
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    graph[name].add(full if full in paths else base)
        graph[name] = {m for m in graph[name] if m in paths and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_circles() -> None:
    # netstack's used to run speedups -> _pure -> ip/tcpwire -> speedups (the twin's
    # parsers imported lazily to get round it); the checksum now has its own module
    assert circles(module_graph()) == []


def test_the_circle_finder_finds_circles() -> None:
    graph = module_graph()
    assert "netstack.checksum" in graph["netstack.ip"]
    assert "netstack.wireguard.speedups" in graph["netstack.wireguard.transport"]
    looped = {**graph, "netstack.checksum": graph["netstack.checksum"] | {"netstack.ip"}}
    assert ["netstack.checksum", "netstack.ip"] in circles(looped)
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def wireguard_reaches(graph: dict[str, set[str]]) -> set[str]:
    """Every netstack module outside netstack.wireguard that WireGuard's modules
    import, directly or through others."""
    seen: set[str] = set()
    todo = [m for m in graph if m.startswith("netstack.wireguard")]
    while todo:
        for child in graph[todo.pop()]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return {m for m in seen if m.startswith("netstack") and not m.startswith("netstack.wireguard")}


def test_wireguard_stands_on_its_own() -> None:
    """netstack/wireguard (its hot path and twin) needs nothing of the TCP/IP stack:
    at most the shared loop timer (issue 14 item 5)."""
    graph = module_graph()
    assert wireguard_reaches(graph) <= {"netstack.looptimer"}
    # and the check sees a reach through another module
    tcp = {
        **graph,
        "netstack.wireguard.timers": graph["netstack.wireguard.timers"] | {"netstack.ip"},
    }
    assert "netstack.checksum" in wireguard_reaches(tcp)
