"""Sans-IO limit cores on an explicit clock, the metrics exposition format, the admin
listener and header rewriting."""

from __future__ import annotations

import math
import re

import httpx
import pytest

from common.health import DOWN, OK, Health
from common.relay.limits import ConnectionLimiter, RateLimiter, TokenBucket, client_key
from common.relay.metrics import Registry
from gateway.proxy import AdminServer, Metrics
from gateway.proxy.headers import request_headers_for_agent, strip_hop_by_hop
from tests.gateway.agentapp import ProxyHarness


def test_token_bucket_on_explicit_clock() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)
    assert bucket.take(100.25) == pytest.approx(0.25)
    assert bucket.take(100.5) == 0.0
    assert bucket.take(1000.0) == 0.0
    assert bucket.tokens == pytest.approx(2.0)  # refilled to burst, then one taken
    assert bucket.take(99.0) == 0.0  # a clock going backwards never adds tokens
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)


def test_rate_limiter_retry_after_and_bounded_memory() -> None:
    limiter = RateLimiter(rate=0.5, burst=1, max_tracked=3)
    assert limiter.check("10.0.0.1", 0.0).allowed
    decision = limiter.check("10.0.0.1", 0.1)
    assert not decision.allowed and decision.retry_after == 2
    assert limiter.check("10.0.0.1", 2.0).allowed
    for i in range(10):
        limiter.check(f"10.0.1.{i}", 3.0)
    assert len(limiter) == 3
    assert RateLimiter(rate=0, burst=1).check("x", 0).allowed


def test_client_key_groups_ipv6_by_64() -> None:
    assert client_key("2001:db8:1:2:3:4:5:6") == client_key("2001:db8:1:2:ffff::1")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert client_key("10.1.2.3") == "10.1.2.3"
    assert client_key("garbage") == "garbage"


def test_connection_limiter() -> None:
    limiter = ConnectionLimiter(per_client=2, total=3)
    assert limiter.try_acquire("a") and limiter.try_acquire("a")
    assert not limiter.try_acquire("a")
    assert limiter.try_acquire("b")
    assert not limiter.try_acquire("c")  # total reached
    limiter.release("a")
    assert limiter.try_acquire("c")
    assert limiter.count("a") == 1 and limiter.open == 3
    limiter.release("zzz")  # unknown: no effect
    assert limiter.open == 3


def test_hop_by_hop_and_forwarded_rewrite() -> None:
    headers = [
        (b"host", b"app.example.com"),
        (b"connection", b"upgrade, x-hop"),
        (b"upgrade", b"websocket"),
        (b"x-hop", b"1"),
        (b"x-forwarded-for", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2"),
        (b"transfer-encoding", b"chunked"),
    ]
    out = request_headers_for_agent(
        headers, client_ip="9.9.9.9", proto="https", chunked=True, upgrade=True
    )
    assert (b"x-forwarded-for", b"1.1.1.1, 2.2.2.2, 9.9.9.9") in out
    assert (b"connection", b"upgrade") in out and (b"upgrade", b"websocket") in out
    assert (b"transfer-encoding", b"chunked") in out
    assert all(name != b"x-hop" for name, _ in out)
    assert strip_hop_by_hop(headers) == [
        (b"host", b"app.example.com"),
        (b"x-forwarded-for", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2"),
    ]


# A small parser for the Prometheus text format (0.0.4), strict enough to catch
# malformed lines: every sample line must match this and belong to a declared family.
SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)?\})? '
    r"(-?[0-9.eE+-]+|\+Inf|-Inf|NaN)$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            types[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, f"bad sample line: {line!r}"
        name = match.group(1)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or base in types, f"undeclared family {name}"
        labels = frozenset(
            (k, v.encode().decode("unicode_escape")) for k, v in LABEL.findall(match.group(3) or "")
        )
        value = match.group(4)
        samples[(name, labels)] = float(value.replace("+Inf", "inf").replace("-Inf", "-inf"))
    return samples


def test_registry_render_and_escaping() -> None:
    registry = Registry()
    counter = registry.counter("c_total", "A counter\nwith newline.", ("who",))
    gauge = registry.gauge("g", "A gauge.")
    hist = registry.histogram("h_seconds", "A histogram.", ("t",), buckets=(0.1, 1.0))
    counter.inc(who='a "quoted" \\ name\n')
    counter.inc(2, who="b")
    gauge.set(-1.5)
    hist.observe(0.05, t="x")
    hist.observe(0.5, t="x")
    hist.observe(5, t="x")
    with pytest.raises(ValueError):
        counter.inc(-1, who="b")
    with pytest.raises(ValueError):
        counter.inc(wrong="x")
    with pytest.raises(ValueError):
        registry.gauge("g", "dup")
    text = registry.render()
    samples = parse_exposition(text)
    assert samples[("c_total", frozenset({("who", 'a "quoted" \\ name\n')}))] == 1
    assert samples[("c_total", frozenset({("who", "b")}))] == 2
    assert samples[("g", frozenset())] == -1.5
    assert samples[("h_seconds_bucket", frozenset({("t", "x"), ("le", "0.1")}))] == 1
    assert samples[("h_seconds_bucket", frozenset({("t", "x"), ("le", "1")}))] == 2
    assert samples[("h_seconds_bucket", frozenset({("t", "x"), ("le", "+Inf")}))] == 3
    assert samples[("h_seconds_count", frozenset({("t", "x")}))] == 3
    assert samples[("h_seconds_sum", frozenset({("t", "x")}))] == pytest.approx(5.55)


def test_wireguard_peer_readings() -> None:
    metrics = Metrics()
    metrics.set_wireguard_peer("agent-1", None, 100, 50)
    metrics.set_wireguard_peer("agent-1", 3.5, 300, 50)
    metrics.set_wireguard_peer("agent-1", 4.0, 10, 60)  # interface recreated: counters reset
    assert metrics.wireguard_bytes.get(agent="agent-1", direction="rx") == 310
    assert metrics.wireguard_bytes.get(agent="agent-1", direction="tx") == 60
    samples = parse_exposition(metrics.render())
    age = samples[
        ("kakuremichi_wireguard_last_handshake_age_seconds", frozenset({("agent", "agent-1")}))
    ]
    assert age == 4.0
    metrics.set_wireguard_peer("agent-2", None, 0, 0)
    samples = parse_exposition(metrics.render())
    never = ("kakuremichi_wireguard_last_handshake_age_seconds", frozenset({("agent", "agent-2")}))
    assert math.isinf(samples[never])
    metrics.forget_wireguard_peer("agent-2")
    assert never not in parse_exposition(metrics.render())


async def test_admin_serves_metrics_that_count_proxy_traffic(proxy: ProxyHarness) -> None:
    health = Health()
    health.set("control", OK, "connected")
    admin = AdminServer(proxy.metrics, health)
    await admin.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as http:
            for _ in range(3):
                await http.get("/headers", headers={"Host": "app.example.com"})
            await http.post("/upload", content=b"z" * 1234, headers={"Host": "app.example.com"})
            await http.get("/", headers={"Host": "unknown.example"})
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin.port}", timeout=10) as adm:
            response = await adm.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            samples = parse_exposition(response.text)
            ok = frozenset({("tunnel", "t1"), ("domain", "app.example.com"), ("code", "200")})
            assert samples[("kakuremichi_http_requests_total", ok)] == 4
            unknown = frozenset({("tunnel", ""), ("domain", ""), ("code", "404")})
            assert samples[("kakuremichi_http_requests_total", unknown)] == 1
            assert (
                samples[
                    ("kakuremichi_http_request_body_bytes_total", frozenset({("tunnel", "t1")}))
                ]
                == 1234
            )
            assert (
                samples[
                    ("kakuremichi_http_response_body_bytes_total", frozenset({("tunnel", "t1")}))
                ]
                > 0
            )
            assert (
                samples[
                    (
                        "kakuremichi_http_request_duration_seconds_count",
                        frozenset({("tunnel", "t1")}),
                    )
                ]
                == 4
            )
            assert (
                samples[("kakuremichi_active_connections", frozenset({("listener", "http")}))] == 0
            )
            fine = await adm.get("/healthz")
            assert fine.status_code == 200
            assert fine.headers["content-type"] == "application/json"
            assert fine.json() == {
                "status": "ok",
                "parts": {"control": {"state": "ok", "reason": "connected"}},
            }
            health.set("control", DOWN, "control away")
            sick = await adm.get("/healthz")
            assert sick.status_code == 503
            assert sick.json()["parts"]["control"] == {"state": "down", "reason": "control away"}
            assert (await adm.get("/nope")).status_code == 404
            assert (await adm.post("/metrics")).status_code == 405
    finally:
        await admin.close()


def test_client_address_behind_trusted_proxies() -> None:
    from gateway.proxy.headers import client_address, parse_networks

    trusted = parse_networks(["10.0.0.0/8", "fd00::/8"])
    xff = [(b"x-forwarded-for", b"6.6.6.6, 1.2.3.4"), (b"x-forwarded-for", b"10.1.1.1")]
    # untrusted peer: its own address, whatever the header says
    assert client_address("9.9.9.9", xff, trusted) == "9.9.9.9"
    # trusted peer: right-most hop that is not a trusted proxy
    assert client_address("10.0.0.5", xff, trusted) == "1.2.3.4"
    # all hops trusted: the left-most one
    assert client_address("10.0.0.5", [(b"x-forwarded-for", b"10.9.9.9")], trusted) == "10.9.9.9"
    # garbage stops the walk at the last trusted hop
    assert (
        client_address("10.0.0.5", [(b"x-forwarded-for", b"1.1.1.1, junk")], trusted) == "10.0.0.5"
    )
    assert client_address("10.0.0.5", [], trusted) == "10.0.0.5"
    assert client_address("10.0.0.5", xff, ()) == "10.0.0.5"
    with pytest.raises(ValueError, match="not an IP network"):
        parse_networks(["10.0.0.0/33"])


def test_connection_limiter_exempts_trusted_proxies() -> None:
    limiter = ConnectionLimiter(per_client=1, total=3)
    assert limiter.try_acquire("10.0.0.1", exempt=True)
    assert limiter.try_acquire("10.0.0.1", exempt=True)
    assert limiter.count("10.0.0.1") == 0 and limiter.open == 2
    assert limiter.try_acquire("1.1.1.1")
    assert not limiter.try_acquire("10.0.0.1", exempt=True)  # total still applies
    limiter.release("10.0.0.1", exempt=True)
    assert limiter.open == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": -1}, "rate"),
        ({"rate": 5, "burst": 0}, "burst"),
        ({"max_header_bytes": 10}, "max_header_bytes"),
        ({"header_timeout": 0}, "header_timeout"),
        ({"max_body_bytes": -5}, "max_body_bytes"),
    ],
)
def test_limit_settings_name_the_bad_field(kwargs: dict[str, float], message: str) -> None:
    from gateway.proxy import LimitSettings

    with pytest.raises(ValueError, match=message):
        LimitSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"upstream_port": 0}, "upstream_port"),
        ({"max_active_per_agent": -1}, "max_active_per_agent"),
    ],
)
def test_proxy_settings_name_the_bad_field(kwargs: dict[str, float], message: str) -> None:
    from gateway.proxy import ProxySettings

    with pytest.raises(ValueError, match=message):
        ProxySettings(**kwargs)  # type: ignore[arg-type]
