"""The routing table: normalisation, updates, malformed input, and a differential check
against a naive model."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.protocol import ProtocolError, parse_tunnel
from common.relay.router import Route, Router, normalize_host
from common.relay.targets import Target
from tests.gateway.agentapp import tunnel


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("example.com:8080", "example.com"),
        ("EXAMPLE.com.:443", "example.com"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("", None),
        (".", None),
        ("[::1", None),
        ("[::1]x", None),
        ("host:port", None),
        ("a" * 300, None),
    ],
)
def test_normalize_host(raw: str, expected: str | None) -> None:
    assert normalize_host(raw) == expected


def test_lookup_http_routes() -> None:
    router = Router()
    router.replace_all(
        [
            tunnel("t1", "App.Example.com", agent_ip="100.64.0.100"),
            tunnel("t2", "off.example.com", enabled=False),
            tunnel("t3", None, protocol="tcp", public_port=2222),
            tunnel("t4", "*.wild.example.com"),
        ]
    )
    route = router.lookup_host("APP.example.com.:443")
    assert route == Route(
        "t1", "app.example.com", "agent-t1", "100.64.0.100", True, target="localhost:8080"
    )
    assert router.lookup_host("off.example.com") == Route(
        "t2", "off.example.com", "agent-t2", "127.0.0.1", False, target="localhost:8080"
    )
    assert router.lookup_host("nope.example.com") is None
    assert router.lookup_host("a.wild.example.com") is not None
    assert router.lookup_host("a.b.wild.example.com") is None
    assert router.lookup_host("wild.example.com") is None
    assert router.lookup_host("") is None
    port_route = router.lookup_port("tcp", 2222)
    assert port_route is not None and port_route.tunnel_id == "t3"
    assert router.lookup_port("udp", 2222) is None
    assert [r.tunnel_id for r in router.port_routes("tcp")] == ["t3"]


def test_updates_and_listeners() -> None:
    router = Router()
    calls = []
    router.add_listener(lambda: calls.append(router.version))
    router.replace_all([tunnel("t1", "a.example")])
    assert router.upsert(tunnel("t1", "b.example"))
    assert router.lookup_host("a.example") is None
    assert router.lookup_host("b.example") is not None
    assert router.remove("t1")
    assert not router.remove("t1")
    assert router.lookup_host("b.example") is None
    assert calls == [1, 2, 3]


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"id": 5},
        {"id": "x", "protocol": "ftp", "agentIp": "1.2.3.4"},
        {"id": "x", "protocol": "http", "domain": None, "agentIp": "1.2.3.4"},
        {"id": "x", "protocol": "http", "domain": "a.example", "agentIp": "not-an-ip"},
        {
            "id": "x",
            "protocol": "http",
            "domain": "a.example",
            "agentIp": "1.2.3.4",
            "enabled": "yes",
        },
        {"id": "x", "protocol": "tcp", "publicPort": 0, "agentIp": "1.2.3.4"},
        {"id": "x", "protocol": "tcp", "publicPort": True, "agentIp": "1.2.3.4"},
        {"id": "x", "protocol": "udp", "publicPort": 70000, "agentIp": "1.2.3.4"},
        {"id": "x", "protocol": "http", "domain": "a:b:c", "agentIp": "1.2.3.4"},
        "not a dict",
    ],
)
def test_malformed_tunnels_never_reach_the_router(bad: Any) -> None:
    # the protocol module refuses them (the whole message is skipped by the client);
    # the router only ever holds typed, bounded tunnels
    with pytest.raises(ProtocolError):
        parse_tunnel(bad)


def test_a_target_this_side_cannot_use_is_skipped_not_raised() -> None:
    def resolve(text: str) -> tuple[str, int, str]:
        target = Target.parse(text)  # ValueError for what the agent cannot dial
        return target.host, target.port, target.path_prefix

    router = Router(upstream=resolve)
    unusable = tunnel("bad", "bad.example", target="ftp://x")
    router.replace_all([unusable, tunnel("ok", "ok.example")])
    assert len(router) == 1 and router.lookup_host("ok.example") is not None
    assert router.upsert(unusable) is False
    assert len(router) == 1


def test_duplicate_domain_prefers_enabled_then_smallest_id() -> None:
    router = Router()
    router.replace_all(
        [
            tunnel("b", "dup.example"),
            tunnel("a", "dup.example", enabled=False),
            tunnel("c", "dup.example"),
        ]
    )
    route = router.lookup_host("dup.example")
    assert route is not None and route.tunnel_id == "b"


DOMAINS = st.sampled_from(["a.example", "b.example", "A.example", "c.example.", "*.x.example"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("upsert"), st.sampled_from("123456"), DOMAINS, st.booleans()),
            st.tuples(st.just("remove"), st.sampled_from("123456")),
        ),
        max_size=30,
    )
)
def test_router_matches_naive_model(ops: list[tuple[Any, ...]]) -> None:
    router = Router()
    model: dict[str, tuple[str, bool]] = {}
    for op in ops:
        if op[0] == "upsert":
            _, tid, domain, enabled = op
            router.upsert(tunnel(tid, domain, enabled=enabled))
            model[tid] = (domain.lower().rstrip("."), enabled)
        else:
            router.remove(op[1])
            model.pop(op[1], None)
    for host in ["a.example", "b.example", "c.example", "q.x.example", "zzz"]:
        candidates = []
        for tid, (domain, enabled) in model.items():
            if domain == host or (
                domain.startswith("*.")
                and host.partition(".")[2] == domain[2:]
                and not any(d == host for d, _ in model.values())
            ):
                candidates.append((not enabled, tid))
        got = router.lookup_host(host)
        if not candidates:
            assert got is None, host
        else:
            assert got is not None and got.tunnel_id == min(candidates)[1], host
