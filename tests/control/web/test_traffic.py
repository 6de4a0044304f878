"""Per-tunnel traffic buckets, handshake ages, the chart, the ``stats`` message and the
reporter that sends it."""

from __future__ import annotations

from typing import Any

import pytest

from common import protocol as p
from common.relay.metrics import Metrics
from common.stats import StatsReporter
from control.traffic import TRANSPORT_WINDOW, Traffic
from control.web.render import human_age, human_bytes, traffic_svg

KEY = "A" * 43 + "="


def t(
    tunnel: str, requests: int = 1, errors: int = 0, bi: int = 10, bo: int = 20
) -> p.TunnelTraffic:
    return p.TunnelTraffic(tunnel, requests, errors, bi, bo)


def test_buckets_sum_over_the_last_hour_and_forget_older() -> None:
    traffic = Traffic()
    known = {"a", "b"}
    start = 6000.0 * 60
    assert traffic.record([t("a"), t("b", 2), t("zzz")], known, start) == {"a", "b"}
    traffic.record([t("a", 3, 1, 5, 5)], known, start + 30)  # same minute
    traffic.record([t("a", 4)], known, start + 59 * 60)  # 59 minutes later
    totals = traffic.totals("a", start + 59 * 60)
    assert (totals.requests, totals.errors, totals.bytes_in, totals.bytes_out) == (8, 1, 25, 45)
    assert traffic.totals("a", start + 60 * 60).requests == 4  # the first minute left
    assert traffic.totals("zzz", start).requests == 0  # unknown ids are not kept
    series = traffic.series("a", start + 59 * 60)
    assert len(series) == 60 and series[0].requests == 4 and series[-1].requests == 4
    # a ring slot reused an hour later starts from zero
    traffic.record([t("a", 1)], known, start + 120 * 60)
    assert traffic.totals("a", start + 120 * 60).requests == 1
    traffic.forget("a")
    assert traffic.totals("a", start + 120 * 60).requests == 0
    # a tunnel deleted elsewhere: its ring goes with the next report
    traffic.record([t("a"), t("b")], known, start)
    traffic.record([t("b")], {"b"}, start)
    assert set(traffic._rings) == {"b"}
    assert traffic.record([t("a", 0, 0, 0, 0)], known, start) == set()  # nothing new


def test_handshake_ages_keep_the_newest() -> None:
    traffic = Traffic()
    traffic.handshakes([p.PeerHandshake(KEY, 30.0)], 1000.0)
    traffic.handshakes([p.PeerHandshake(KEY, 100.0), p.PeerHandshake("B" * 43 + "=", None)], 1000.0)
    assert traffic.handshake_age(KEY, 1010.0) == 40.0
    assert traffic.handshake_age("B" * 43 + "=", 1010.0) is None
    assert traffic.handshake_age(None, 1010.0) is None


def test_chart_is_an_accessible_svg_and_escapes_its_title() -> None:
    traffic = Traffic()
    traffic.record([t("a", 5, 2)], {"a"}, 600.0)
    svg = traffic_svg(traffic.series("a", 600.0), '<script>alert("x")</script>')
    assert svg.startswith("<svg") and 'role="img"' in svg and "<title>" in svg
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert "5 requests, 2 errors" in svg
    assert svg.count("<rect") == 3  # the background, one bar and its error part
    empty = traffic_svg(Traffic().series("a", 600.0), "x")
    assert empty.count("<rect") == 1


def test_human_units() -> None:
    assert human_bytes(0) == "0 B" and human_bytes(2048) == "2.0 KiB" and human_bytes(None) == "-"
    assert (
        human_age(None) == "never" and human_age(5) == "5 s ago" and human_age(600) == "10 min ago"
    )
    assert human_age(7200) == "2 h ago" and human_age(3 * 86400) == "3 d ago"


def test_stats_frame_round_trip_and_bounds() -> None:
    stats = p.Stats((t("a", 1, 2, 3, 4),), (p.PeerHandshake(KEY, 1.5), p.PeerHandshake(KEY, None)))
    frame = p.decode(p.encode("stats", stats.to_wire()))
    assert p.parse_stats(frame.data) == stats
    assert p.parse_stats({}) == p.Stats((), ())
    bad: list[dict[str, Any]] = [
        {"tunnels": "x"},
        {"tunnels": [{"tunnelId": "a", "requests": -1, "errors": 0, "bytesIn": 0, "bytesOut": 0}]},
        {
            "tunnels": [
                {"tunnelId": "a", "requests": 2**60, "errors": 0, "bytesIn": 0, "bytesOut": 0}
            ]
        },
        {
            "tunnels": [
                {"tunnelId": "a" * 100, "requests": 1, "errors": 0, "bytesIn": 0, "bytesOut": 0}
            ]
        },
        {"tunnels": [1]},
        {"tunnels": [{}] * (p.MAX_STATS_ENTRIES + 1)},
        {"peers": [{"publicKey": "nope", "handshakeAge": 1}]},
        {"peers": [{"publicKey": KEY, "handshakeAge": -1}]},
        {"peers": [{"publicKey": KEY, "handshakeAge": "1"}]},
    ]
    for data in bad:
        with pytest.raises(p.ProtocolError):
            p.parse_stats(data)


def test_metrics_tunnel_totals() -> None:
    metrics = Metrics()
    metrics.request_done("t1", "a.example", 200, 0.01)
    metrics.request_done("t1", "a.example", 502, 0.01)
    metrics.request_done("", "", 404, None)  # matched no tunnel: left out
    metrics.upstream_errors.inc(tunnel="t1", kind="unreachable")
    metrics.request_bytes.inc(100, tunnel="t1")
    metrics.response_bytes.inc(1000, tunnel="t1")
    metrics.tcp_connections.inc(tunnel="t2")
    metrics.upstream_errors.inc(tunnel="t2", kind="unreachable")
    metrics.tcp_bytes.inc(7, tunnel="t2", direction="in")
    metrics.tcp_bytes.inc(9, tunnel="t2", direction="out")
    metrics.udp_bytes.inc(3, tunnel="t3", direction="out")
    assert metrics.tunnel_totals() == {
        "t1": (2, 1, 100, 1000),
        "t2": (1, 1, 7, 9),
        "t3": (0, 0, 0, 3),
    }


async def test_reporter_sends_deltas_and_keeps_them_while_control_is_away() -> None:
    totals = {"a": (1, 0, 10, 20)}
    sent: list[dict[str, Any]] = []
    up = True

    async def send(type_: str, data: dict[str, Any]) -> bool:
        assert type_ == "stats"
        if up:
            sent.append(data)
        return up

    async def peers() -> list[p.PeerHandshake]:
        return [p.PeerHandshake(KEY, 2.0)]

    reporter = StatsReporter(lambda: dict(totals), peers, send, interval=1.0)
    assert await reporter.report()
    assert p.parse_stats(sent[-1]).tunnels == (t("a", 1, 0, 10, 20),)
    totals["a"] = (3, 1, 15, 20)
    up = False
    assert not await reporter.report()  # Control away: nothing is forgotten
    totals["a"] = (4, 1, 16, 20)
    up = True
    assert await reporter.report()
    assert p.parse_stats(sent[-1]).tunnels == (t("a", 3, 1, 6, 0),)
    assert await reporter.report()  # nothing new: no tunnel entries, handshakes still
    assert p.parse_stats(sent[-1]) == p.Stats((), (p.PeerHandshake(KEY, 2.0),))
    totals["a"] = (1, 0, 1, 1)  # counters reset (a restart): counted from zero
    assert await reporter.report()
    assert p.parse_stats(sent[-1]).tunnels == (t("a", 1, 0, 1, 1),)
    assert reporter.reports == 4


async def test_event_bus_fan_out_overflow_and_close() -> None:
    from control.events import EventBus

    bus = EventBus(max_subscribers=2)
    a, b = bus.subscribe(), bus.subscribe()
    assert a is not None and b is not None and bus.subscribe() is None
    bus.publish("presence", kind="agent", id="x", online=True)
    event = await a.next(1.0)
    assert event is not None and event.kind == "presence" and event.data["kind"] == "agent"
    for i in range(300):  # b never reads: it is told to start over, once
        bus.publish("traffic", id=str(i))
    assert (await b.next(1.0)).kind == "overflow"  # type: ignore[union-attr]
    assert await b.next(0.01) is None
    a.close()
    assert len(bus) == 1
    c = bus.subscribe()
    assert c is not None
    bus.close()
    assert (await c.next(1.0)).kind == "closing"  # type: ignore[union-attr]


def test_which_transport_each_session_uses() -> None:
    """Reports say udp or tcp (WireGuard over the stream transport); a key stays on tcp
    while any report within the window said so (an agent may use UDP to one gateway
    and TCP to another), then follows the reports."""
    stats = p.Stats((), (p.PeerHandshake(KEY, 1.0, "tcp"), p.PeerHandshake(KEY, 2.0, "udp")))
    assert p.parse_stats(p.decode(p.encode("stats", stats.to_wire())).data) == stats
    older = {"peers": [{"publicKey": KEY, "handshakeAge": 1}]}  # an agent before the field
    assert p.parse_stats(older).peers[0].transport is None
    for transport in ("quic", 4, "", "udp" * 3):
        with pytest.raises(p.ProtocolError, match="transport"):
            p.parse_stats(
                {"peers": [{"publicKey": KEY, "handshakeAge": 1, "transport": transport}]}
            )
    traffic = Traffic()
    assert traffic.transport(KEY) is None and traffic.transport(None) is None
    traffic.handshakes([p.PeerHandshake(KEY, 5.0, "udp")], 1000.0)
    assert traffic.transport(KEY) == "udp"
    traffic.handshakes([p.PeerHandshake(KEY, 5.0, "tcp")], 1010.0)
    traffic.handshakes([p.PeerHandshake(KEY, 5.0, "udp")], 1020.0)  # another gateway
    assert traffic.transport(KEY) == "tcp"
    traffic.handshakes([p.PeerHandshake(KEY, 5.0, "udp")], 1010.0 + TRANSPORT_WINDOW)
    assert traffic.transport(KEY) == "udp"
    traffic.handshakes([p.PeerHandshake(KEY, None, "tcp")], 2000.0)  # no session: ignored
    assert traffic.transport(KEY) == "udp"


async def test_event_bus_replays_after_a_sequence_number() -> None:
    from control.events import REPLAY, EventBus

    bus = EventBus()
    assert bus.seq == 0
    bus.publish("presence", id="a")
    seen = bus.seq
    bus.publish("presence", id="b")
    bus.publish("health", id="c")
    late = bus.subscribe(after=seen)  # subscribed after two more events happened
    assert late is not None
    got = [await late.next(1.0), await late.next(1.0)]
    assert [(e.kind, e.data["id"], e.seq) for e in got if e] == [
        ("presence", "b", 2),
        ("health", "c", 3),
    ]
    assert await late.next(0.01) is None
    current = bus.subscribe(after=bus.seq)  # nothing missed
    assert current is not None and await current.next(0.01) is None
    for i in range(REPLAY + 5):
        bus.publish("traffic", id=str(i))
    stale = bus.subscribe(after=seen)  # older than the ring: start over
    assert stale is not None and (await stale.next(1.0)).kind == "overflow"  # type: ignore[union-attr]
