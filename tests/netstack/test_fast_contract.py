"""The TCP hot path's contract with the pure-Python connection, declared once.

``netstack/tcpbase.py`` declares every name the hot path may use on a connection
(``HOT_PATH_FIELDS``, ``HOT_PATH_METHODS``) and on what it reaches through one
(``HOT_PATH_CONFIG``, ``HOT_PATH_SEND_BUFFER``, ``HOT_PATH_CONGESTION``).
``netstack/_fast.pyx`` uses the fields through the connection's ``__dict__``
(``d["_snd_una"]``), which Cython cannot check when it builds: a field renamed in
``TcpBase.__init__`` would only show as a ``KeyError`` on the hot path at run time.
``netstack/_pure.py`` uses them as attributes.

Here every name either source uses is read out of it and checked against the
declaration, the declaration against what the two use together (no stale name), and
real connections (fresh, and established at both ends) against the declaration.  So a
rename in the ``.pyx``, in the twin, in the declaration or in ``TcpBase`` fails here;
the last tests show the check failing on a renamed copy of each.  No compiled
extension is needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from netstack import congestion, tcpbase
from netstack.sendbuf import SendBuffer
from netstack.tcp import TcpConnection
from netstack.tcpbase import TcpConfig
from tests.netstack.test_established_path import connected_pair

ROOT = Path(__file__).resolve().parents[2]
PYX = ROOT / "netstack" / "_fast.pyx"
TWIN = ROOT / "netstack" / "_pure.py"

DECLARED: dict[str, frozenset[str]] = {
    "fields": tcpbase.HOT_PATH_FIELDS,
    "methods": tcpbase.HOT_PATH_METHODS,
    "config": tcpbase.HOT_PATH_CONFIG,
    "send buffer": tcpbase.HOT_PATH_SEND_BUFFER,
    "congestion": tcpbase.HOT_PATH_CONGESTION,
}

# What a source names, by where the name is looked up.  The .pyx holds a connection as
# ``conn`` or ``found`` and its dict as ``d``; the twin holds it as ``conn``.
_PATTERNS = {
    "fields": r'\bd\["(\w+)"\]',  # the .pyx's dict lookups: fields only
    "connection": r"\b(?:conn|found)\.(\w+)",  # fields, methods or properties
    "config": r'\bconfig\.(\w+)|"config"\]\.(\w+)',
    "send buffer": r"\bsndbuf\.(\w+)",
    "congestion": r'\b_cc(?:"\])?\.(\w+)',
}


def used_names(source: str) -> dict[str, set[str]]:
    """Every name ``source`` uses on a connection and its parts, by pattern."""
    used: dict[str, set[str]] = {}
    for group, pattern in _PATTERNS.items():
        found = {next(g for g in m.groups() if g) for m in re.finditer(pattern, source)}
        used[group] = found - {"__dict__"}
    return used


def blind_spots(name: str, source: str) -> list[str]:
    """Ways ``source`` could reach a connection's fields that the patterns do not see."""
    problems = []
    if re.search(r'\bd\[(?!")', source):
        problems.append(f"{name} indexes a connection's dict with a non-literal key")
    for target in re.findall(r"(\w+)\s*=\s*\w+\.__dict__", source):
        if target != "d":
            problems.append(f"{name} holds a connection's dict as {target!r}, not 'd'")
    if re.search(r"\b(?:get|set|has)attr\(\s*(?:conn|found)\b", source):
        problems.append(f"{name} reaches a connection's fields through getattr/setattr")
    return problems


def violations(
    pyx: str,
    twin: str,
    connections: Iterable[TcpConnection],
    declared: Mapping[str, frozenset[str]] = DECLARED,
) -> list[str]:
    """Every way the two hot paths, the declaration and ``connections`` disagree."""
    problems = blind_spots("_fast.pyx", pyx) + blind_spots("_pure.py", twin)
    on_connection = declared["fields"] | declared["methods"]
    used_together: dict[str, set[str]] = {group: set() for group in _PATTERNS}
    for name, source in (("_fast.pyx", pyx), ("_pure.py", twin)):
        used = used_names(source)
        if not used["connection"]:
            problems.append(f"{name}: no connection names found: has its style changed?")
        allowed = {
            "fields": declared["fields"],
            "connection": on_connection,
            "config": declared["config"],
            "send buffer": declared["send buffer"],
            "congestion": declared["congestion"],
        }
        for group, names in used.items():
            used_together[group] |= names
            if names - allowed[group]:
                problems.append(
                    f"{name} uses {group} names not declared in tcpbase: "
                    f"{sorted(names - allowed[group])}"
                )
    stale = {
        "fields/methods": on_connection - used_together["fields"] - used_together["connection"],
        "config": declared["config"] - used_together["config"],
        "send buffer": declared["send buffer"] - used_together["send buffer"],
        "congestion": declared["congestion"] - used_together["congestion"],
    }
    for group, unused in stale.items():
        if unused:
            problems.append(f"tcpbase declares {group} neither hot path uses: {sorted(unused)}")
    for conn in connections:
        fields = set(vars(conn))
        if declared["fields"] - fields:
            problems.append(
                f"a {conn.state.name} connection lacks declared fields (not set by "
                f"TcpBase.__init__ as plain attributes): {sorted(declared['fields'] - fields)}"
            )
        for method in sorted(declared["methods"]):
            if method in fields or not hasattr(type(conn), method):
                problems.append(f"TcpConnection has no method or property {method!r}")
        for field in sorted(declared["config"]):
            if not hasattr(conn.config, field):
                problems.append(f"TcpConfig has no {field!r}")
        sndbuf = vars(conn).get("_sndbuf")
        if isinstance(sndbuf, SendBuffer):
            missing = {n for n in declared["send buffer"] if not hasattr(sndbuf, n)}
            if missing:
                problems.append(f"SendBuffer has no {sorted(missing)}")
    for algorithm in ("cubic", "newreno"):
        controller = congestion.make(algorithm)
        for method in sorted(declared["congestion"]):
            if not callable(getattr(controller, method, None)):
                problems.append(f"the {algorithm} controller has no method {method!r}")
    return problems


@pytest.fixture(scope="module")
def connections() -> list[TcpConnection]:
    """A fresh connection (what ``__init__`` set) and an established pair."""
    fresh = TcpConnection.connect(
        local_port=1, remote_port=2, iss=3, ts_offset=4, now=0.0, config=TcpConfig()
    )
    client, server, _ = connected_pair()
    return [fresh, client, server]


def test_hot_paths_declaration_and_connection_agree(connections: list[TcpConnection]) -> None:
    assert violations(PYX.read_text(), TWIN.read_text(), connections) == []


def test_both_hot_paths_use_the_connection() -> None:
    # the patterns still see each source's style (else the check above proves nothing)
    for source in (PYX.read_text(), TWIN.read_text()):
        used = used_names(source)
        assert len(used["connection"]) >= 5 and used["send buffer"] and used["config"]
    assert len(used_names(PYX.read_text())["fields"]) > 40


def _fails_naming(problems: list[str], name: str) -> bool:
    return any(name in problem for problem in problems)


def test_a_rename_in_the_cython_source_fails(connections: list[TcpConnection]) -> None:
    pyx, twin = PYX.read_text(), TWIN.read_text()
    for old, new, name in (
        ('d["_snd_una"]', 'd["_snd_unacked"]', "_snd_unacked"),
        ("conn._rtt_sample(", "conn._sample_rtt(", "_sample_rtt"),
        ("found.state", "found.tcp_state", "tcp_state"),
        ("sndbuf._head", "sndbuf._front", "_front"),
        ('d["config"].delayed_ack', 'd["config"].ack_delay', "ack_delay"),
        ('d["_cc"].on_ack', 'd["_cc"].acked', "acked"),
    ):
        assert old in pyx, old
        assert _fails_naming(violations(pyx.replace(old, new), twin, connections), name)
    assert _fails_naming(
        violations(pyx.replace('d["_ts_offset"]', "d[key]"), twin, connections), "non-literal"
    )


def test_a_rename_in_the_twin_fails(connections: list[TcpConnection]) -> None:
    pyx, twin = PYX.read_text(), TWIN.read_text()
    for old, new, name in (
        ("conn._rcv_nxt", "conn._rcv_next", "_rcv_next"),
        ("conn.config.delayed_ack", "conn.config.ack_delay", "ack_delay"),
        ("conn._cc.on_ack", "conn._cc.acked", "acked"),
    ):
        assert old in twin, old
        assert _fails_naming(violations(pyx, twin.replace(old, new), connections), name)


def test_a_rename_in_the_connection_fails() -> None:
    conn = TcpConnection.connect(
        local_port=1, remote_port=2, iss=3, ts_offset=4, now=0.0, config=TcpConfig()
    )
    vars(conn)["_snd_unacked"] = vars(conn).pop("_snd_una")  # as if __init__ renamed it
    problems = violations(PYX.read_text(), TWIN.read_text(), [conn])
    assert _fails_naming(problems, "lacks declared fields") and _fails_naming(problems, "_snd_una")


def test_a_rename_in_the_declaration_fails(connections: list[TcpConnection]) -> None:
    declared = dict(DECLARED)
    declared["fields"] = (DECLARED["fields"] - {"_rto"}) | {"_rto_value"}
    problems = violations(PYX.read_text(), TWIN.read_text(), connections, declared)
    assert _fails_naming(problems, "not declared in tcpbase: ['_rto']")  # both sources use it
    assert _fails_naming(problems, "neither hot path uses: ['_rto_value']")
    assert _fails_naming(problems, "lacks declared fields")
