"""The typed messages from Control to its clients (``common.protocol``): what Control
builds parses back to the same values on the client, through JSON; anything else —
a field of the wrong type, out of range, too long, missing — is a ProtocolError
naming the field, never another exception."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import protocol as p
from tests.controlserver import public_key

ids = st.text("abcdef0123456789-", min_size=1, max_size=36)
names = st.text(max_size=40)
labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
v4 = st.integers(0, 2**32 - 1).map(lambda n: ".".join(str((n >> s) & 255) for s in (24, 16, 8, 0)))
keys = st.integers(1, 200).map(public_key)
ports = st.integers(1, 65535)


@st.composite
def tunnels(draw: st.DrawFn) -> p.TunnelSpec:
    protocol = draw(st.sampled_from(p.TUNNEL_PROTOCOLS))
    return p.TunnelSpec(
        id=draw(ids),
        protocol=protocol,
        domain=draw(domains) if protocol == "http" else None,
        public_port=draw(ports) if protocol != "http" else None,
        target=draw(st.sampled_from(["127.0.0.1:8080", "http://[::1]:3000/app/ü", "db:5432"])),
        agent_id=draw(ids),
        agent_ip=draw(v4),
        enabled=draw(st.booleans()),
        proxy_protocol=draw(st.sampled_from((None, *p.PROXY_PROTOCOLS.get(protocol, ())))),
    )


@st.composite
def agent_configs(draw: st.DrawFn) -> p.AgentConfig:
    gateways = draw(
        st.lists(
            st.builds(
                p.GatewayPeerSpec,
                id=ids,
                name=names,
                public_key=keys,
                endpoint=st.none() | st.builds("{}:{}".format, v4, ports),
                virtual_ip=v4,
                allowed_ips=st.lists(v4.map(lambda a: a + "/32"), max_size=3).map(tuple),
                stream_endpoint=st.none() | st.builds("{}:{}".format, v4, ports),
            ),
            max_size=4,
        )
    )
    return p.AgentConfig(
        p.AgentSelf(draw(ids), draw(names), "100.64.3.0/24", draw(v4)),
        tuple(gateways),
        tuple(draw(st.lists(tunnels(), max_size=5))),
    )


@st.composite
def gateway_configs(draw: st.DrawFn) -> p.GatewayConfig:
    agents = draw(
        st.lists(
            st.builds(
                p.AgentPeerSpec,
                id=ids,
                name=names,
                public_key=keys,
                subnet=st.just("100.64.7.0/24"),
                virtual_ip=v4,
                allowed_ips=st.lists(v4.map(lambda a: a + "/32"), max_size=2).map(tuple),
                gateway_ip=v4,
            ),
            max_size=4,
        )
    )
    certificates = draw(
        st.lists(
            st.builds(
                p.CertificateSpec,
                domain=domains,
                certificate=st.just("-----BEGIN CERTIFICATE-----\nMII…\n"),
                private_key=st.just("-----BEGIN PRIVATE KEY-----\nMII…\n"),
                not_after=st.floats(0, 4e9),
            ),
            max_size=2,
        )
    )
    return p.GatewayConfig(
        p.GatewaySelf(
            draw(ids),
            draw(names),
            draw(st.integers(1, 250)),
            draw(st.none() | v4),
            draw(st.none() | ports),
            tuple(draw(st.lists(v4.map(lambda a: a + "/24"), max_size=3))),
        ),
        tuple(agents),
        tuple(draw(st.lists(tunnels(), max_size=5))),
        tuple(certificates),
    )


def through_json(data: dict[str, Any]) -> Any:
    return json.loads(json.dumps(data))


@given(agent_configs())
def test_agent_config_round_trip(config: p.AgentConfig) -> None:
    assert p.parse_config("agent", through_json(config.to_wire())) == config


@given(gateway_configs())
def test_gateway_config_round_trip(config: p.GatewayConfig) -> None:
    assert p.parse_config("gateway", through_json(config.to_wire())) == config


@given(tunnels())
def test_tunnel_messages_round_trip(tunnel: p.TunnelSpec) -> None:
    assert p.parse_tunnel(through_json(tunnel.to_wire())) == tunnel
    delete = p.TunnelDelete(tunnel.id, tunnel.agent_id)
    assert p.parse_tunnel_delete(through_json(delete.to_wire())) == delete


def test_other_messages_round_trip() -> None:
    success = p.AuthSuccess("a1", "laptop", "agent", 30.0)
    assert p.parse_auth_success(success.to_wire()) == success
    report = p.ErrorReport("invalid_field", "'x' must be a string")
    assert p.parse_error(report.to_wire()) == report
    beat = p.Heartbeat(1.5, 7)
    assert p.parse_heartbeat(beat.to_wire()) == beat
    health = [p.TunnelHealth("t1", "healthy", ""), p.TunnelHealth("t2", "unhealthy", "refused")]
    assert p.parse_status(p.status_wire(health)) == health
    auth = p.Auth("gtw_x" + "y" * 40, "gateway", public_key(1), "v", "192.0.2.1", 51820)
    assert p.parse_auth(auth.to_wire()) == auth
    streams = p.Auth("gtw_x" + "y" * 40, "gateway", public_key(1), "v", "192.0.2.1", 51820, 443)
    assert p.parse_auth(through_json(streams.to_wire())) == streams
    assert "gtw_" not in repr(auth)  # the API key never reaches a log through repr
    cert = p.CertificateSpec("a.example.com", "c", "-----BEGIN PRIVATE KEY-----x", 1.0)
    assert "PRIVATE" not in repr(cert)


def test_domains_arrive_as_the_router_matches_them() -> None:
    wire = {**_tunnel(), "domain": "App.Example.COM."}
    assert p.parse_tunnel(wire).domain == "app.example.com"


def _tunnel() -> dict[str, Any]:
    return p.TunnelSpec(
        "t1", "http", "app.example.com", None, "127.0.0.1:80", "a1", "100.64.0.100", True
    ).to_wire()


BAD_TUNNEL_FIELDS: list[tuple[str, Any]] = [
    ("id", ""),
    ("id", 5),
    ("id", "x" * 65),
    ("protocol", "ftp"),
    ("protocol", None),
    ("domain", None),
    ("domain", "a b.example.com"),
    ("domain", "x" * 254),
    ("domain", "app.example.com:80"),
    ("domain", "ünï.example.com"),
    ("target", 7),
    ("target", "x" * 2049),
    ("target", "\ud800"),
    ("agentIp", "100.64.0.300"),
    ("agentIp", None),
    ("enabled", "yes"),
    ("enabled", 1),
    ("agentId", ["a"]),
    ("proxyProtocol", "v2"),  # an http tunnel takes none
]

BAD_RAW_TUNNEL_FIELDS: list[tuple[str, str, Any]] = [
    ("udp", "proxyProtocol", "v1"),  # version 1 has no UDP form
    ("tcp", "proxyProtocol", "v3"),
    ("tcp", "proxyProtocol", "V1"),
    ("tcp", "proxyProtocol", 2),
    ("tcp", "proxyProtocol", ["v1"]),
    ("udp", "proxyProtocol", ""),
]


@pytest.mark.parametrize(("protocol", "key", "value"), BAD_RAW_TUNNEL_FIELDS)
def test_bad_raw_tunnel_fields_are_refused_by_name(protocol: str, key: str, value: Any) -> None:
    wire = {**_tunnel(), "protocol": protocol, "domain": None, "publicPort": 2222, key: value}
    with pytest.raises(p.ProtocolError) as caught:
        p.parse_tunnel(wire)
    assert caught.value.code == "invalid_field" and f"'{key}'" in caught.value.message


def test_an_older_control_sends_no_proxy_protocol() -> None:
    wire = {**_tunnel(), "protocol": "tcp", "domain": None, "publicPort": 2222}
    del wire["proxyProtocol"]
    assert p.parse_tunnel(wire).proxy_protocol is None
    assert p.parse_tunnel({**wire, "proxyProtocol": "v1"}).proxy_protocol == "v1"


@pytest.mark.parametrize(("key", "value"), BAD_TUNNEL_FIELDS)
def test_bad_tunnel_fields_are_refused_by_name(key: str, value: Any) -> None:
    with pytest.raises(p.ProtocolError) as caught:
        p.parse_tunnel({**_tunnel(), key: value})
    assert caught.value.code == "invalid_field" and f"'{key}'" in caught.value.message


@pytest.mark.parametrize("port", [0, 65536, -1, 10**40, True, 1.5, "80", None])
def test_raw_tunnel_ports_are_bounded(port: Any) -> None:
    wire = {**_tunnel(), "protocol": "tcp", "domain": None, "publicPort": port}
    with pytest.raises(p.ProtocolError, match="publicPort"):
        p.parse_tunnel(wire)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(gateway_configs(), st.data())
def test_mutated_configs_parse_or_are_refused(config: p.GatewayConfig, data: st.DataObject) -> None:
    """Any value anywhere in a valid config: it parses or it is a ProtocolError."""
    wire = through_json(config.to_wire())
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in node:
                paths.append((node, key))
                walk(node[key])
        elif isinstance(node, list):
            for index in range(len(node)):
                paths.append((node, index))
                walk(node[index])

    walk(wire)
    container, key = data.draw(st.sampled_from(paths))
    container[key] = data.draw(json_values)
    for role in ("gateway", "agent"):
        with contextlib.suppress(p.ProtocolError):
            p.parse_config(role, wire)


def test_a_list_too_long_is_refused() -> None:
    config = {
        **p.AgentConfig(p.AgentSelf("a", "n", "100.64.0.0/24", "100.64.0.100"), (), ()).to_wire(),
        "tunnels": [None] * (p.MAX_ENTRIES + 1),
    }
    with pytest.raises(p.ProtocolError, match="at most"):
        p.parse_agent_config(config)


@pytest.mark.parametrize("port", [0, 65536, -1, True, 1.5, "443", 10**40])
def test_a_gateways_https_port_is_bounded(port: Any) -> None:
    """The port agents reach a gateway's stream transport at (``httpsPort`` in its auth;
    absent or null: HTTPS is off)."""
    auth = p.Auth("gtw_x" + "y" * 40, "gateway", public_key(1), "v", "192.0.2.1", 51820, 443)
    with pytest.raises(p.ProtocolError, match="httpsPort"):
        p.parse_auth({**auth.to_wire(), "httpsPort": port})
    assert p.parse_auth({**auth.to_wire(), "httpsPort": None}).https_port is None
    older = {k: v for k, v in auth.to_wire().items() if k != "httpsPort"}
    assert p.parse_auth(older).https_port is None  # a gateway from before the field


@pytest.mark.parametrize(
    "endpoint", ["192.0.2.1", "192.0.2.1:0", "example.com:443", "[::1]443", 443, "x" * 65]
)
def test_a_gateways_stream_endpoint_is_checked(endpoint: Any) -> None:
    gateway = p.GatewayPeerSpec(
        "g1", "edge", public_key(2), "192.0.2.1:51820", "100.64.0.1", ("100.64.0.1/32",)
    )
    agent = p.AgentConfig(p.AgentSelf("a", "n", "100.64.0.0/24", "100.64.0.100"), (gateway,), ())
    wire = through_json(agent.to_wire())
    assert p.parse_agent_config(wire).gateways[0].stream_endpoint is None
    wire["gateways"][0]["streamEndpoint"] = "[2001:db8::1]:443"
    assert p.parse_agent_config(wire).gateways[0].stream_endpoint == "[2001:db8::1]:443"
    wire["gateways"][0]["streamEndpoint"] = endpoint
    with pytest.raises(p.ProtocolError):
        p.parse_agent_config(wire)
