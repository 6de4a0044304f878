"""The Cython hot path's field-name contract with the pure-Python connection.

``netstack/_fast.pyx`` reads and writes a TCP connection's state through its
``__dict__`` (``d["_snd_una"]``) and calls a few of its methods and those of its send
buffer and configuration by name.  Cython cannot check those names at build time: a
field renamed in ``TcpBase.__init__`` would only fail as a ``KeyError`` (or a silently
new key) at run time, on the hot path.  This test reads every such name out of the
``.pyx`` source and checks it against a real, established connection, so a rename on
either side fails here first.  It needs no compiled extension.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from netstack.sendbuf import SendBuffer
from netstack.tcp import TcpConnection
from tests.netstack.test_established_path import connected_pair

PYX = Path(__file__).resolve().parents[2] / "netstack" / "_fast.pyx"


def names(pattern: str) -> set[str]:
    found = set(re.findall(pattern, PYX.read_text()))
    assert found, f"no match for {pattern!r}: has _fast.pyx changed its style?"
    return found


@pytest.fixture(scope="module")
def pair() -> tuple[TcpConnection, TcpConnection]:
    """One established connection pair (both ends), shared by the module's tests."""
    client, server, _ = connected_pair()
    return client, server


def test_every_field_the_hot_path_touches_is_set_by_the_connection(
    pair: tuple[TcpConnection, TcpConnection],
) -> None:
    for conn in pair:
        missing = names(r'\bd\["(\w+)"\]') - set(vars(conn))
        assert not missing, f"_fast.pyx uses fields TcpBase does not set: {sorted(missing)}"


def test_every_method_and_attribute_it_calls_exists(
    pair: tuple[TcpConnection, TcpConnection],
) -> None:
    client = pair[0]
    for name in names(r"\bconn\.(\w+)"):
        if name != "__dict__":
            assert hasattr(client, name), f"TcpConnection has no {name!r}"
    for name in names(r"\bconfig\.(\w+)") | names(r'd\["config"\]\.(\w+)'):
        assert hasattr(client.config, name), f"the TCP config has no {name!r}"
    sndbuf = vars(client)["_sndbuf"]
    assert isinstance(sndbuf, SendBuffer)
    for name in names(r"\bsndbuf\.(\w+)"):
        assert hasattr(sndbuf, name), f"SendBuffer has no {name!r}"
    for name in names(r'd\["_cc"\]\.(\w+)'):
        assert callable(getattr(vars(client)["_cc"], name, None)), f"the controller has no {name!r}"


def test_the_contract_check_would_catch_a_rename(
    pair: tuple[TcpConnection, TcpConnection],
) -> None:
    # the check is only worth something if a name missing from the connection shows
    fields = set(vars(pair[0]))
    renamed = fields - {"_snd_una"}
    assert names(r'\bd\["(\w+)"\]') - renamed == {"_snd_una"}


TWIN = PYX.with_name("_pure.py")


def test_every_field_the_pure_twin_touches_is_set_by_the_connection(
    pair: tuple[TcpConnection, TcpConnection],
) -> None:
    # the twin reads the same state as attributes (``conn._snd_una``): one list of
    # names, the connection's own, checked for both hot paths
    twin = set(re.findall(r"\bconn\.(_\w+)", TWIN.read_text()))
    assert len(twin) > 20, "no match: has _pure.py changed its style?"
    for conn in pair:
        fields = set(vars(conn)) | {n for n in dir(type(conn)) if n.startswith("_")}
        assert not twin - fields, f"_pure.py uses fields TcpBase lacks: {sorted(twin - fields)}"
