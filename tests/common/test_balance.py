"""Replicas of one tunnel (``common.relay.balance`` and the router's replica routes):
who takes traffic, in which proportions, what a failure does, and the wire form's
compatibility with a Control that knows nothing of replicas."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import pytest

from common import protocol as p
from common.relay.balance import (
    DRAINING,
    EJECTED,
    HEALTHY,
    OFFLINE,
    STANDBY,
    UNHEALTHY,
    TunnelBalance,
    replica_token,
)
from common.relay.router import Router, pick_replica


def _spec(agent: str, **kw: Any) -> p.ReplicaSpec:
    return p.ReplicaSpec(agent, kw.pop("ip", f"100.64.{ord(agent[-1]) % 200}.100"), **kw)


def _balance(
    *specs: p.ReplicaSpec, mode: str = "round_robin", sticky: str | None = None
) -> TunnelBalance:
    balance = TunnelBalance("t1")
    balance.configure(mode, sticky, specs)
    return balance


def _count(balance: TunnelBalance, n: int, now: float = 0.0, **kw: Any) -> dict[str | None, int]:
    picks = (balance.pick(now, **kw) for _ in range(n))
    return dict(collections.Counter(r.agent_id if r else None for r in picks))


def test_round_robin_alternates_and_follows_weights() -> None:
    balance = _balance(_spec("a"), _spec("b"))
    assert [balance.pick(0.0).agent_id for _ in range(4)] == ["a", "b", "a", "b"]  # type: ignore[union-attr]
    balance = _balance(_spec("a", weight=3), _spec("b", weight=1))
    assert _count(balance, 400) == {"a": 300, "b": 100}
    # smooth: the heavy replica never takes four in a row
    run = "".join(balance.pick(0.0).agent_id for _ in range(40))  # type: ignore[union-attr]
    assert "aaaa" not in run


def test_standby_only_when_no_active_is_usable() -> None:
    balance = _balance(_spec("a"), _spec("b", role="standby"))
    assert _count(balance, 10) == {"a": 10}
    balance.configure(
        "round_robin", None, [_spec("a", health="unhealthy"), _spec("b", role="standby")]
    )
    assert _count(balance, 10) == {"b": 10}
    states = {r.agent_id: s for r, s in balance.states(0.0)}
    assert states == {"a": UNHEALTHY, "b": STANDBY}


def test_unhealthy_offline_and_draining_replicas_take_nothing() -> None:
    specs = [
        _spec("a"),
        _spec("b", health="unhealthy"),
        _spec("c", health="offline"),
        _spec("d", draining=True),
    ]
    balance = _balance(*specs)
    assert _count(balance, 20) == {"a": 20}
    assert {r.agent_id: s for r, s in balance.states(0.0)} == {
        "a": HEALTHY,
        "b": UNHEALTHY,
        "c": OFFLINE,
        "d": DRAINING,
    }


def test_when_nobody_passes_the_checks_it_still_serves_but_never_a_draining_one() -> None:
    balance = _balance(_spec("a", health="unhealthy"), _spec("b", health="offline"))
    assert _count(balance, 4) == {"a": 4}  # not offline is the better bet
    balance = _balance(_spec("a", health="offline"), _spec("b", draining=True))
    assert _count(balance, 4) == {"a": 4}
    balance = _balance(_spec("a", draining=True), _spec("b", draining=True))
    assert balance.pick(0.0) is None


def test_a_failure_ejects_for_a_growing_back_off_and_a_success_clears_it() -> None:
    balance = _balance(_spec("a"), _spec("b"))
    a = balance.by_agent["a"]
    balance.failed(a, 10.0, "dial refused")
    assert _count(balance, 10, now=10.5) == {"b": 10}
    assert {r.agent_id: s for r, s in balance.states(10.5)}["a"] == EJECTED
    # the back-off is over: the next picks are its probes
    assert _count(balance, 10, now=11.0) == {"a": 5, "b": 5}
    balance.failed(a, 11.0, "reset")  # the probe failed: twice as long
    assert _count(balance, 4, now=12.9) == {"b": 4}
    assert "a" in _count(balance, 4, now=13.0)
    balance.failed(a, 13.0, "again")
    balance.failed(a, 13.5, "while out")  # requests failing together count once
    assert a.backoff == 4.0
    balance.succeeded(a)
    balance.failed(a, 30.0, "later")
    assert a.backoff == 1.0
    for t in range(10):
        balance.failed(a, 100.0 + 100 * t, "flapping")
    assert a.backoff == 30.0


def test_a_retry_goes_to_another_replica_if_there_is_one() -> None:
    balance = _balance(_spec("a"), _spec("b"))
    a, b = balance.by_agent["a"], balance.by_agent["b"]
    assert all(balance.pick(0.0, exclude=a) is b for _ in range(5))
    lone = _balance(_spec("a"), _spec("b", draining=True))
    assert lone.pick(0.0, exclude=lone.by_agent["a"]) is lone.by_agent["a"]


def test_sticky_by_client_address_moves_only_the_clients_of_a_replica_that_left() -> None:
    specs = [_spec("a"), _spec("b"), _spec("c")]
    balance = _balance(*specs, sticky="client_ip")
    clients = [f"198.51.100.{i}" for i in range(1, 200)]
    before = {c: balance.pick(0.0, client_ip=c).agent_id for c in clients}  # type: ignore[union-attr]
    assert set(before.values()) == {"a", "b", "c"}
    assert all(balance.pick(0.0, client_ip=c).agent_id == before[c] for c in clients)  # type: ignore[union-attr]
    balance.configure(
        "round_robin", "client_ip", [specs[0], _spec("b", health="offline"), specs[2]]
    )
    after = {c: balance.pick(0.0, client_ip=c).agent_id for c in clients}  # type: ignore[union-attr]
    assert all(after[c] == before[c] for c in clients if before[c] != "b")
    assert all(after[c] in ("a", "c") for c in clients if before[c] == "b")
    balance.configure("round_robin", "client_ip", specs)  # b is back: its clients too
    assert {c: balance.pick(0.0, client_ip=c).agent_id for c in clients} == before  # type: ignore[union-attr]


def test_sticky_cookie_names_a_replica_while_it_is_a_candidate() -> None:
    balance = _balance(_spec("a"), _spec("b"), sticky="cookie")
    token_b = replica_token("t1", "b")
    assert all(balance.pick(0.0, token=token_b).agent_id == "b" for _ in range(5))  # type: ignore[union-attr]
    assert _count(balance, 4, token="0123456789abcdef") == {"a": 2, "b": 2}
    balance.configure("round_robin", "cookie", [_spec("a"), _spec("b", draining=True)])
    assert balance.pick(0.0, token=token_b).agent_id == "a"  # type: ignore[union-attr]


def test_least_connections_counts_open_work_per_weight() -> None:
    balance = _balance(_spec("a"), _spec("b", weight=2), mode="least_connections")
    load = {"100.64.97.100": 3, "100.64.98.100": 3}
    balance.extra_load = load.__getitem__
    assert balance.pick(0.0).agent_id == "b"  # type: ignore[union-attr]
    balance.by_agent["b"].open = 6  # 9 open at weight 2 against 3 at weight 1
    assert balance.pick(0.0).agent_id == "a"  # type: ignore[union-attr]


def test_configuration_keeps_a_replicas_state_and_reports_it_going_offline() -> None:
    balance = _balance(_spec("a"), _spec("b"))
    a = balance.by_agent["a"]
    balance.failed(a, 0.0, "dial")
    went = balance.configure("round_robin", None, [_spec("a", health="offline"), _spec("b")])
    assert went == [a] and balance.by_agent["a"] is a and a.backoff == 1.0
    assert balance.configure("round_robin", None, [_spec("a", health="offline"), _spec("b")]) == []


# -- the router ------------------------------------------------------------------------


def _tunnel(**kw: Any) -> p.TunnelSpec:
    base: dict[str, Any] = dict(
        id="t1",
        protocol="http",
        domain="app.example.com",
        public_port=None,
        target="127.0.0.1:8080",
        agent_id="a",
        agent_ip="100.64.1.100",
        enabled=True,
    )
    base.update(kw)
    return p.TunnelSpec(**base)


REPLICAS = (p.ReplicaSpec("a", "100.64.1.100"), p.ReplicaSpec("b", "100.64.2.100"))


def test_the_router_gives_a_replicated_tunnel_a_route_per_replica() -> None:
    router = Router()
    router.replace_all([_tunnel(replicas=REPLICAS)])
    route = router.lookup_host("app.example.com")
    assert route is not None and len(route.replicas) == 2
    order = [pick_replica(route, 0.0).upstream_host for _ in range(4)]  # type: ignore[union-attr]
    assert order == ["100.64.1.100", "100.64.2.100"] * 2
    first = pick_replica(route, 0.0)
    assert first is not None and first.tunnel_id == "t1" and first.domain == "app.example.com"
    assert pick_replica(first, 0.0) is first  # a replica route is final
    # a health change keeps the routes equal and the state of the others
    assert route.balance is not None
    route.balance.failed(route.balance.by_agent["b"], 0.0, "dial")
    router.upsert(
        _tunnel(replicas=(dataclasses.replace(REPLICAS[0], health="unhealthy"), REPLICAS[1]))
    )
    again = router.lookup_host("app.example.com")
    assert again == route and again is not None and again.balance is route.balance
    states = {agent: state for _, agent, state in router.balancer.states(0.5)}
    assert states == {"a": UNHEALTHY, "b": EJECTED}
    hosts = {pick_replica(again, 1.0).upstream_host for _ in range(4)}  # type: ignore[union-attr]
    assert hosts == {"100.64.2.100"}  # b's back-off is over, a's target is failing
    router.upsert(_tunnel())  # one agent again: no balancer left
    assert router.balancer.tunnels == {}


def test_every_router_listener_sees_the_replicas_that_went_offline_in_that_change() -> None:
    router = Router()
    router.replace_all([_tunnel(replicas=REPLICAS)])
    seen: list[list[str]] = []
    router.add_listener(lambda: seen.append([r.agent_id for r in router.balancer.went_offline]))
    router.add_listener(lambda: seen.append([r.agent_id for r in router.balancer.went_offline]))
    offline = (dataclasses.replace(REPLICAS[0], health="offline"), REPLICAS[1])
    router.upsert(_tunnel(replicas=offline))
    assert seen == [["a"], ["a"]]  # both listeners (the HTTP pool, the TCP forwarder)
    router.upsert(_tunnel(replicas=offline, target="127.0.0.1:8081"))  # still offline
    assert seen[2:] == [[], []]


def test_a_single_agent_tunnel_is_routed_as_before() -> None:
    router = Router()
    router.replace_all(
        [_tunnel(), _tunnel(id="t2", domain="two.example.com", replicas=REPLICAS[:1])]
    )
    for host in ("app.example.com", "two.example.com"):
        route = router.lookup_host(host)
        assert route is not None and route.replicas == () and route.balance is None
        assert pick_replica(route, 0.0) is route
    assert router.balancer.tunnels == {}


def test_raw_tunnels_get_replicas_too_and_the_agent_ignores_them() -> None:
    raw = _tunnel(protocol="tcp", domain=None, public_port=2222, replicas=REPLICAS)
    router = Router()
    router.replace_all([raw])
    route = router.lookup_port("tcp", 2222)
    assert route is not None and {r.upstream_host for r in route.replicas} == {
        "100.64.1.100",
        "100.64.2.100",
    }
    agent_side = Router(upstream=lambda target: ("127.0.0.1", 8080, ""))
    agent_side.replace_all([raw])
    route = agent_side.lookup_port("tcp", 2222)
    assert route is not None and route.replicas == () and route.upstream_host == "127.0.0.1"


# -- the wire form ---------------------------------------------------------------------


def test_a_single_agent_tunnel_frame_is_what_it_always_was() -> None:
    assert set(_tunnel().to_wire()) == {
        "id",
        "protocol",
        "domain",
        "publicPort",
        "target",
        "agentId",
        "agentIp",
        "enabled",
        "proxyProtocol",
    }


def test_replicas_round_trip_and_an_older_control_has_none() -> None:
    spec = _tunnel(
        replicas=(REPLICAS[0], p.ReplicaSpec("b", "100.64.2.100", 5, "standby", True, "offline")),
        balance="least_connections",
        sticky="cookie",
    )
    assert p.parse_tunnel(spec.to_wire()) == spec
    wire = spec.to_wire()
    for key in ("replicas", "balance", "sticky"):
        del wire[key]
    old = p.parse_tunnel(wire)
    assert old.replicas == () and old.balance == "round_robin" and old.sticky is None
    # defaults for fields a replica may leave out
    wire = {**_tunnel().to_wire(), "replicas": [{"agentId": "a", "agentIp": "100.64.1.100"}]}
    assert p.parse_tunnel(wire).replicas == (p.ReplicaSpec("a", "100.64.1.100"),)


BAD_REPLICAS: list[tuple[str, Any]] = [
    ("replicas", "a,b"),
    ("replicas", [{"agentId": "a", "agentIp": "100.64.1.100"}] * 2),  # twice
    ("replicas", [{"agentId": "b", "agentIp": "100.64.2.100"}]),  # without agentId's
    ("replicas", [{"agentId": "", "agentIp": "100.64.1.100"}]),
    ("replicas", [{"agentId": "a", "agentIp": "nowhere"}]),
    ("replicas", [{"agentId": "a", "agentIp": "100.64.1.100", "weight": 0}]),
    ("replicas", [{"agentId": "a", "agentIp": "100.64.1.100", "weight": 1001}]),
    ("replicas", [{"agentId": "a", "agentIp": "100.64.1.100", "weight": True}]),
    ("replicas", [{"agentId": "a", "agentIp": "100.64.1.100", "role": "spare"}]),
    ("replicas", [{"agentId": "a", "agentIp": "100.64.1.100", "health": "fine"}]),
    ("replicas", [{"agentId": "a", "agentIp": "100.64.1.100", "draining": "yes"}]),
    ("replicas", [{"agentId": f"x{i}", "agentIp": "100.64.1.100"} for i in range(65)]),
    ("balance", "random"),
    ("balance", 1),
    ("sticky", "header"),
    ("sticky", True),
]


@pytest.mark.parametrize(("key", "value"), BAD_REPLICAS)
def test_bad_replica_fields_are_refused(key: str, value: Any) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.parse_tunnel({**_tunnel().to_wire(), key: value})
    assert caught.value.code == "invalid_field"


def test_a_raw_tunnel_cannot_be_sticky_by_cookie() -> None:
    wire = _tunnel(protocol="tcp", domain=None, public_port=2222).to_wire()
    with pytest.raises(p.ProtocolError, match="sticky"):
        p.parse_tunnel({**wire, "sticky": "cookie"})
    assert p.parse_tunnel({**wire, "sticky": "client_ip"}).sticky == "client_ip"
