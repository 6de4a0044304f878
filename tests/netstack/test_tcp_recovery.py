"""Loss recovery and sending rate on the seeded virtual-clock simulator, each mechanism
by name: RACK-TLP (RFC 8985), PRR (RFC 6937), undo of a spurious RTO (RFC 5682's
question, RFC 3522's timestamps), pacing by time slices, and BBR."""

from __future__ import annotations

import hashlib
import random
import statistics
import zlib
from typing import Any

import pytest

from netstack import rack as rack_module
from netstack.bbr import Bbr
from netstack.ip import parse_ip
from netstack.stack import Stack
from netstack.tcp import TcpConfig, TcpConnection
from netstack.tcpwire import parse_tcp
from tests.netstack.netsim import Impairment, Network, Pump, run_pumps
from tests.netstack.test_tcp_sim import B6, establish, make_net, transfer


def data_offset(conn: TcpConnection, packet: bytes) -> tuple[int, int] | None:
    """``(start, end)`` of a data packet ``conn`` sent, as offsets, else None."""
    ip = parse_ip(packet)
    seg = parse_tcp(ip.payload, ip.src, ip.dst)
    if not seg.payload:
        return None
    start = (seg.seq - conn._iss) & 0xFFFFFFFF
    return start, start + len(seg.payload)


def lose_before_the_last(config: TcpConfig) -> tuple[TcpConnection, float, list[int]]:
    """100 kB on a 40 ms path; the three segments before the last one are lost once
    (the last one arrives and is SACKed).  Returns the sender, the time the transfer
    took after the losses, and the lost segments' ends."""
    net, a, b = make_net(impairment=Impairment(delay=0.02), config=config)
    client, server = establish(net, a, b)
    total = 100_000
    dropped: list[int] = []
    lost_at: list[float] = []

    def drop(packet: bytes) -> bool:
        span = data_offset(client, packet)
        if span is None:
            return True
        start, end = span
        if (
            total - 3 * 1368 < end <= total
            and start < total - 200  # not the last segment
            and end not in dropped
            and not client.stats_retransmitted
        ):
            dropped.append(end)
            lost_at.append(net.now)
            return False
        return True

    net.paths[(id(a), id(b))].filter = drop
    pump, sink = Pump(client, random.Random(3).randbytes(total), close_after=False), Pump(server)
    run_pumps(net, [pump, sink], lambda: sink.received_len == total, timeout=30)
    return client, net.now - lost_at[0], dropped


def test_rack_marks_by_time() -> None:
    """Segments lost before one that arrives are marked lost by time -- RACK.rtt plus
    the reordering window after they were sent -- and repaired in about one round
    trip, with no probe and no RTO; three duplicate ACKs never come here (one segment
    follows the losses), so without RACK only the tail loss probe finds them."""
    client, took, dropped = lose_before_the_last(TcpConfig())
    assert len(dropped) == 3
    assert client._rack.stats_marked >= 3 * 1368
    assert client.stats_tlp == 0 and client.stats_rto == 0
    assert client.stats_recoveries == 1
    # noticed one RTT after sending plus the reordering window (a quarter of the RTT),
    # repaired in another RTT: well before a probe (2 SRTT) would even be sent
    assert took < 0.04 * 3
    without, took_without, _ = lose_before_the_last(TcpConfig(rack=False))
    assert without._rack.stats_marked == 0
    assert without.stats_tlp + without.stats_rto >= 1
    assert took < took_without


def test_rack_detects_a_lost_retransmission_without_rto() -> None:
    """A retransmission lost again is timed like any segment, from its own sending:
    RACK marks it once data sent after it is delivered, a round trip later, where
    DupThresh recovery would wait for the RTO.  The path is a 10 Mbit/s bottleneck, so
    ACKs arrive spread out and a retransmission judged by its original's send time
    would be sent again on the very next ACK."""
    net, a, b = make_net(impairment=Impairment(delay=0.02, bandwidth=1_250_000))
    client, server = establish(net, a, b)
    sent: list[float] = []

    def drop_twice(packet: bytes) -> bool:
        span = data_offset(client, packet)
        if span is None or span[0] != 40 * 1368 + 1:
            return True
        sent.append(net.now)
        return len(sent) > 2  # the original and the first retransmission

    net.paths[(id(a), id(b))].filter = drop_twice
    transfer(net, client, server, 600_000, 0)
    assert len(sent) == 3
    assert client.stats_rto == 0 and client.stats_tlp == 0
    # the second retransmission waited for the first to be out a round trip (40 ms)
    assert sent[2] - sent[1] >= 0.04


def reordering_recoveries(monkeypatch: pytest.MonkeyPatch, adaptive: bool) -> TcpConnection:
    if not adaptive:
        monkeypatch.setattr(rack_module.Rack, "on_spurious", lambda self, now, srtt: None)
    net, a, b = make_net(seed=21, impairment=Impairment(reorder=0.05, reorder_delay=0.05))
    client, server = establish(net, a, b)
    transfer(net, client, server, 3_000_000, 0)
    monkeypatch.undo()
    return client


def test_rack_reordering_window_adapts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reordering only (no loss): a retransmission that proves spurious (Eifel) widens
    RACK's reordering window by a quarter of the minimum RTT each time, so later
    reordering is waited out instead of "repaired"."""
    adaptive = reordering_recoveries(monkeypatch, adaptive=True)
    assert adaptive._rack.reordering_seen
    assert adaptive.stats_undo > 0
    assert adaptive._rack.reo_wnd_mult > 1
    fixed = reordering_recoveries(monkeypatch, adaptive=False)
    assert fixed._rack.reo_wnd_mult == 1
    assert adaptive.stats_recoveries < fixed.stats_recoveries
    assert adaptive.stats_retransmitted < fixed.stats_retransmitted


def prr_scenario(name: str) -> tuple[Network, Stack, Stack, TcpConnection, TcpConnection]:
    """``one-loss``: one segment lost from a window of 60+ segments (PRR's proportional
    part does the whole recovery); ``burst-loss``: 45 segments in a row lost from it
    (what is in flight falls far below ssthresh at once: PRR-SSRB's part); ``random``:
    2% random loss.  The first two on a 20 Mbit/s bottleneck, so ACKs come spread out."""
    if name == "random":
        net, a, b = make_net(seed=7, impairment=Impairment(loss=0.02, delay=0.01))
        client, server = establish(net, a, b)
        return net, a, b, client, server
    net, a, b = make_net(seed=7, impairment=Impairment(delay=0.02, bandwidth=2_500_000))
    client, server = establish(net, a, b)
    burst = 1 if name == "one-loss" else 45
    dropped: list[int] = []

    def drop(packet: bytes) -> bool:
        span = data_offset(client, packet)
        if span is None or client.stats_recoveries or client._cwnd < 60 * client._snd_mss:
            return True
        if not dropped or (len(dropped) < burst and span[0] == dropped[-1]):
            dropped.append(span[1])
            return False
        return True

    net.paths[(id(a), id(b))].filter = drop
    return net, a, b, client, server


@pytest.mark.parametrize("scenario", ["one-loss", "burst-loss", "random"])
def test_prr_keeps_the_rate_within_its_bound(
    monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    """RFC 6937, checked after every transmission in recovery: while more than ssthresh
    is in flight, what recovery sent stays within ssthresh/RecoverFS of what the ACKs
    delivered (a segment of rounding each way, as the fast retransmit always goes); below
    ssthresh, what follows one ACK is at most max(prr_delivered - prr_out, that ACK's
    DeliveredData) + MSS (PRR-SSRB: never faster than slow start; the same rounding);
    and recovery ends with cwnd = ssthresh."""
    from netstack import tcpsend

    checked = {"proportional": 0, "ssrb": 0, "exits": 0}
    real_transmit = tcpsend.SendSide._transmit
    real_ack = tcpsend.SendSide._ack_advanced
    real_prr = tcpsend.SendSide._prr_on_ack
    last_ack: list[tuple[int, int, bool]] = []  # (prr_out, allowance, below ssthresh)

    def prr_on_ack(self: TcpConnection, delivered: int) -> None:
        mss = self._snd_mss
        credit = self._prr_delivered + delivered - self._prr_out
        below = self._pipe() <= self._ssthresh
        last_ack[:] = [(self._prr_out, max(credit, delivered) + mss, below)]
        real_prr(self, delivered)

    def transmit(self: TcpConnection, now: float, out: list[Any], wire: Any = None) -> None:
        pipe_before = self._pipe()
        real_transmit(self, now, out, wire)
        if not self._in_recovery or self._cc_model:
            return
        mss = self._snd_mss
        if pipe_before > self._ssthresh:
            bound = -(-self._prr_delivered * self._ssthresh // self._recover_fs)
            # the fast retransmit always goes, and a segment may start in the last
            # bytes of room: a segment of rounding each way
            assert self._prr_out <= bound + 2 * mss, (self._prr_out, bound)
            checked["proportional"] += 1
        if last_ack and last_ack[0][2] and self._prr_out > mss:  # not the fast retransmit
            out_at_ack, allowance, _ = last_ack[0]
            assert self._prr_out - out_at_ack <= allowance + mss, (self._prr_out, last_ack)
            checked["ssrb"] += 1

    def ack_advanced(self: TcpConnection, ack: int, seg: Any, now: float) -> None:
        was = self._in_recovery
        real_ack(self, ack, seg, now)
        if was and not self._in_recovery and not self.stats_undo:
            assert self._cwnd == max(self._ssthresh, 2 * self._snd_mss)
            checked["exits"] += 1

    monkeypatch.setattr(tcpsend.SendSide, "_transmit", transmit)
    monkeypatch.setattr(tcpsend.SendSide, "_ack_advanced", ack_advanced)
    monkeypatch.setattr(tcpsend.SendSide, "_prr_on_ack", prr_on_ack)
    net, _, _, client, server = prr_scenario(scenario)
    transfer(net, client, server, 3_000_000 if scenario == "random" else 2_000_000, 0)
    assert client.stats_rto == 0
    if scenario == "random":
        assert client.stats_recoveries > 5 and checked["exits"] > 3
        assert checked["proportional"] > 20 and checked["ssrb"] > 20
    else:
        assert client.stats_recoveries == 1 and checked["exits"] == 1
        assert checked["proportional" if scenario == "one-loss" else "ssrb"] > 50


def test_spurious_rto_is_undone() -> None:
    """The ACKs stall for longer than the RTO (a delay spike, nothing lost): the RTO
    fires and re-sends SND.UNA, then the first late ACK -- of the original, echoing its
    older timestamp -- arrives while the spike still holds the rest back.  The RTO is
    found spurious and undone: the window comes back, and go-back-N stops (the next
    ACKs make room for new data, not for the flight again)."""
    net, a, b = make_net(impairment=Impairment(delay=0.01))
    client, server = establish(net, a, b)
    pump, sink = Pump(client, random.Random(5).randbytes(2_000_000)), Pump(server)
    run_pumps(net, [pump, sink], lambda: sink.received_len > 500_000, timeout=30)
    cwnd = client._cwnd
    back = net.paths[(id(b), id(a))]
    back.impairment = Impairment(delay=0.45)  # every ACK from now on takes 0.45 s
    run_pumps(net, [pump, sink], lambda: client.stats_rto > 0, timeout=5)
    assert client.stats_retransmitted == 1
    run_pumps(net, [pump, sink], lambda: client.stats_undo > 0, timeout=5)
    back.impairment = Impairment(delay=0.01)
    run_pumps(net, [pump, sink], lambda: sink.eof, timeout=60)
    assert client.stats_rto == 1
    assert client.stats_spurious_rto == 1 and client.stats_undo == 1
    assert client._cwnd >= cwnd // 2  # not the one segment an RTO leaves
    assert client.stats_retransmitted == 1  # the RTO's segment, not the flight again
    assert sink.hasher.digest() == hashlib.sha256(pump.payload).digest()


def departures(config: TcpConfig, size: int = 3_000_000) -> tuple[list[float], TcpConnection]:
    net, a, b = make_net(impairment=Impairment(delay=0.025), config=config)
    client, server = establish(net, a, b)
    times: list[float] = []

    def record(packet: bytes) -> bool:
        if data_offset(client, packet) is not None:
            times.append(net.now)
        return True

    net.paths[(id(a), id(b))].filter = record
    transfer(net, client, server, size, 0)
    return times, client


def largest_burst(times: list[float], window: float = 0.0005) -> int:
    """The most data segments that left within ``window`` seconds of each other."""
    best = start = 0
    for end in range(len(times)):
        while times[end] - times[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_pacing_spreads_a_burst() -> None:
    """Without pacing a window leaves as fast as ACKs release it -- here, where one ACK
    acknowledges a whole window, as one burst; paced, the sender sends time slices of
    about 1 ms of its rate, woken by one deadline per slice (no timer per segment)."""
    unpaced, _ = departures(TcpConfig())
    paced, conn = departures(TcpConfig(pacing=True))
    assert largest_burst(unpaced) > 60
    assert conn.stats_paced > 50  # the slices were timed, not only ACK-clocked
    rate = conn._pace_rate
    slice_segments = max(2, rate * 0.001 / 1368)
    assert largest_burst(paced[len(paced) // 2 :]) <= 2 * slice_segments + 2
    # the same bytes, in comparable time (pacing slows nothing down here)
    assert paced[-1] - paced[0] < 1.5 * (unpaced[-1] - unpaced[0])


def bottleneck_run(
    algorithm: str, loss: float = 0.0, size: int = 15_000_000
) -> tuple[float, float, TcpConnection]:
    """``size`` bytes through a 20 Mbit/s bottleneck with a deep (1 MB) drop-tail queue,
    a 40 ms RTT and ``loss`` random loss: the delivery rate over the second half (a
    share of the bottleneck's) and the median queueing delay the sender kept at the
    bottleneck meanwhile."""
    bandwidth = 2_500_000.0
    imp = Impairment(delay=0.02, bandwidth=bandwidth, queue_limit=1_000_000, loss=loss)
    net, a, b = make_net(seed=3, impairment=imp, config=TcpConfig(congestion_control=algorithm))
    client, server = establish(net, a, b)
    path = net.paths[(id(a), id(b))]
    pump, sink = Pump(client, bytes(size)), Pump(server)
    pump.keep = sink.keep = False
    queue: list[float] = []
    half: list[float] = []

    def done() -> bool:
        if sink.received_len > size // 2:
            if not half:
                half.append(net.now)
            queue.append(max(0.0, path.busy_until - net.now))
        return sink.eof

    run_pumps(net, [pump, sink], done, timeout=120)
    rate = (size - size // 2) / (net.now - half[0])
    return rate / bandwidth, statistics.median(queue), client


def bbr_of(conn: TcpConnection) -> Bbr:
    assert isinstance(conn._cc, Bbr)
    return conn._cc


def test_bbr_converges_to_the_bottleneck_rate_and_drains_its_queue() -> None:
    """BBR finds the bottleneck's rate and keeps its queue near empty (DRAIN, then
    PROBE_BW's 0.75 phase); CUBIC fills the whole buffer before it backs off."""
    share, queue_delay, conn = bottleneck_run("bbr")
    assert share > 0.9
    assert bbr_of(conn).state in ("probe_bw", "probe_rtt")
    assert 0.8 * 2_500_000 < bbr_of(conn).btl_bw < 1.2 * 2_500_000
    assert queue_delay < 0.02  # below half the 40 ms propagation RTT
    cubic_share, cubic_queue, _ = bottleneck_run("cubic")
    assert cubic_share > 0.9
    assert cubic_queue > 5 * queue_delay


def test_bbr_keeps_its_rate_under_random_loss() -> None:
    """1% random loss on the 20 Mbit/s, 40 ms path: BBR's model ignores loss, so its
    bandwidth estimate stays the bottleneck's and it keeps the path full; CUBIC's window
    cannot grow past a few dozen segments (Mathis et al.: ~4 Mbit/s here)."""
    share, _, conn = bottleneck_run("bbr", loss=0.01, size=10_000_000)
    assert conn.stats_recoveries > 10  # the loss was there
    assert share > 0.85
    assert 0.8 * 2_500_000 < bbr_of(conn).btl_bw < 1.2 * 2_500_000
    cubic_share, _, _ = bottleneck_run("cubic", loss=0.01, size=10_000_000)
    assert cubic_share < 0.5 * share


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_bbr_startup_keeps_doubling_through_random_loss(seed: int) -> None:
    """100 Mbit/s, 40 ms RTT, 1% random loss: a window of a few hundred segments is in
    recovery most of the time, and BBR's window must keep growing there (Linux's
    bbr_set_cwnd runs on every ACK) or STARTUP sees three rounds without growth and
    leaves with a fraction of the path's rate (it did: 0.25-0.56 of it at 0.5 s, 4-6 MB
    in the first second)."""
    bandwidth = 12_500_000.0
    imp = Impairment(delay=0.02, bandwidth=bandwidth, queue_limit=2_000_000, loss=0.01)
    net, a, b = make_net(seed=seed, impairment=imp, config=TcpConfig(congestion_control="bbr"))
    client, server = establish(net, a, b)
    pump, sink = Pump(client, bytes(20_000_000)), Pump(server)
    pump.keep = sink.keep = False
    start = net.now
    at_half: list[float] = []

    def first_second() -> bool:
        if not at_half and net.now - start >= 0.5:
            at_half.append(bbr_of(client).btl_bw)
        return net.now - start >= 1.0

    run_pumps(net, [pump, sink], first_second, timeout=30)
    assert client.stats_recoveries >= 3  # the loss was there
    assert at_half[0] > 0.7 * bandwidth
    assert sink.received_len > 6_000_000  # about half of what the path carries in 1 s


def departure_digest(algorithm: str) -> str:
    """Every data and ACK packet of a 3 MB transfer with loss and reordering, each with
    its time: the digest of the whole run."""
    imp = Impairment(loss=0.01, reorder=0.02, delay=0.01, bandwidth=2_500_000)
    net, a, b = make_net(seed=5, impairment=imp, config=TcpConfig(congestion_control=algorithm))
    client, server = establish(net, a, b)
    digest = hashlib.sha256()

    def record(packet: bytes) -> bool:
        digest.update(repr(net.now).encode() + packet)
        return True

    net.paths[(id(a), id(b))].filter = record
    net.paths[(id(b), id(a))].filter = record
    transfer(net, client, server, 3_000_000, 0, seed=5)
    return digest.hexdigest()


@pytest.mark.parametrize("algorithm", ["bbr", "cubic"])
def test_network_helper_is_deterministic(algorithm: str) -> None:
    """The runs above replay exactly, packet by packet and to the nanosecond (same seed,
    same run): the core reads no clock and no random source it was not given."""
    assert departure_digest(algorithm) == departure_digest(algorithm)


def test_a_lost_fin_marked_by_rack_is_sent_again_once() -> None:
    """RACK marks a lost FIN like data; re-sending it takes it out of the lost ranges.
    Before, the recovery loop sent it again up to 4,096 times per call: in this run
    (test_tcp_sim's v6 loss1 transfer, where it was found) 86,017 FINs, while the
    transfer still completed."""
    net, a, b = make_net(seed=zlib.crc32(b"loss1") % 1000, impairment=Impairment(loss=0.01))
    client, server = establish(net, a, b, B6)
    fins = {"client": 0, "server": 0}

    def count(side: str) -> Any:
        def fin(packet: bytes) -> bool:
            ip = parse_ip(packet)
            if parse_tcp(ip.payload, ip.src, ip.dst).flags & 0x01:
                fins[side] += 1
            return True

        return fin

    net.paths[(id(a), id(b))].filter = count("client")
    net.paths[(id(b), id(a))].filter = count("server")
    transfer(net, client, server, 3_000_000, 2_000_000, seed=5)
    assert 1 <= fins["client"] <= 3 and 1 <= fins["server"] <= 3, fins
