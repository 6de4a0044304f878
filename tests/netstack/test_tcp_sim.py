"""TCP on the seeded virtual-clock network simulator: transfers and each feature by name."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
import zlib

import pytest

from netstack import events as ev
from netstack.ip import PROTO_TCP, pack_address, parse_ip
from netstack.stack import Stack
from netstack.tcp import TcpConfig, TcpConnection, TcpState
from netstack.tcpwire import ACK, FIN, RST, SYN, TcpSegment, build_tcp, parse_tcp
from tests.netstack.netsim import Impairment, Network, Pump, run_pumps

A = "10.0.0.1"
B = "10.0.0.2"
A6 = "fd00::1"
B6 = "fd00::2"


def make_net(
    seed: int = 1,
    impairment: Impairment | None = None,
    config: TcpConfig | None = None,
    config_b: TcpConfig | None = None,
) -> tuple[Network, Stack, Stack]:
    net = Network(seed)
    a = net.add(
        Stack([A, A6], rng=random.Random(seed * 7 + 1), tcp_config=config),
        pack_address(A),
        pack_address(A6),
    )
    b = net.add(
        Stack([B, B6], rng=random.Random(seed * 7 + 2), tcp_config=config_b or config),
        pack_address(B),
        pack_address(B6),
    )
    net.connect(a, b, impairment or Impairment())
    return net, a, b


def establish(
    net: Network, a: Stack, b: Stack, address: str = B, port: int = 80
) -> tuple[TcpConnection, TcpConnection]:
    listener = b.listen(port)
    client = a.connect(address, port, net.now)
    accepted: list[TcpConnection] = []

    def done() -> bool:
        conn = listener.accept()
        if conn is not None:
            accepted.append(conn)
        return bool(accepted) and client.state is TcpState.ESTABLISHED

    net.run_until(done, timeout=120)
    return client, accepted[0]


def transfer(
    net: Network,
    client: TcpConnection,
    server: TcpConnection,
    up: int,
    down: int,
    seed: int = 0,
    timeout: float = 900.0,
) -> tuple[Pump, Pump]:
    rng = random.Random(seed)
    up_data, down_data = rng.randbytes(up), rng.randbytes(down)
    p_client, p_server = Pump(client, up_data), Pump(server, down_data)
    p_client.keep = p_server.keep = False
    run_pumps(net, [p_client, p_server], lambda: p_client.eof and p_server.eof, timeout=timeout)
    assert p_server.received_len == up
    assert p_client.received_len == down
    assert p_server.hasher.digest() == hashlib.sha256(up_data).digest()
    assert p_client.hasher.digest() == hashlib.sha256(down_data).digest()
    return p_client, p_server


def wait_closed(net: Network, *conns: TcpConnection) -> None:
    net.run_until(
        lambda: all(c.state in (TcpState.TIME_WAIT, TcpState.CLOSED) for c in conns), timeout=300
    )


IMPAIRMENTS = {
    "clean": Impairment(),
    "loss1": Impairment(loss=0.01),
    "loss5": Impairment(loss=0.05),
    "reorder": Impairment(reorder=0.2, reorder_delay=0.02),
    "duplicate": Impairment(duplicate=0.1),
    "delay": Impairment(delay=0.05),
    "everything": Impairment(loss=0.03, duplicate=0.02, reorder=0.1, delay=0.02),
    "bottleneck": Impairment(delay=0.01, bandwidth=2_000_000, queue_limit=60_000),
}


@pytest.mark.parametrize("name", list(IMPAIRMENTS))
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_transfer_both_directions_hash_checked(name: str, v6: bool) -> None:
    net, a, b = make_net(seed=zlib.crc32(name.encode()) % 1000, impairment=IMPAIRMENTS[name])
    client, server = establish(net, a, b, B6 if v6 else B)
    transfer(net, client, server, 3_000_000, 2_000_000, seed=5)
    wait_closed(net, client, server)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12])
def test_many_megabytes_with_loss_five_percent(seed: int) -> None:
    imp = Impairment(loss=0.05, reorder=0.05, duplicate=0.01, delay=0.01)
    net, a, b = make_net(seed=seed, impairment=imp)
    client, server = establish(net, a, b)
    transfer(net, client, server, 12_000_000, 8_000_000, seed=seed)


def test_deterministic_replay() -> None:
    def run() -> tuple[float, int]:
        net, a, b = make_net(seed=3, impairment=IMPAIRMENTS["everything"])
        client, server = establish(net, a, b)
        transfer(net, client, server, 500_000, 500_000, seed=3)
        return net.now, net.delivered

    assert run() == run()


def test_handshake_options_window_scaling_sack_timestamps_mss() -> None:
    net, a, b = make_net()
    client, server = establish(net, a, b)
    for conn in (client, server):
        assert conn._wscale_ok and conn._rcv_wscale == 7 and conn._snd_wscale == 7
        assert conn._sack_ok and conn._ts_ok
        assert conn._send_mss() == 1420 - 40
    net6, a6, b6 = make_net()
    c6, _ = establish(net6, a6, b6, B6)
    assert c6._send_mss() == 1420 - 60


@pytest.mark.parametrize("peer_mss", [None, 40, 536, 1200, 9000])
@pytest.mark.parametrize("timestamps", [True, False])
@pytest.mark.parametrize("passive", [True, False])
def test_cached_send_mss_follows_the_syn(
    peer_mss: int | None, timestamps: bool, passive: bool
) -> None:
    """``_snd_mss`` / ``_snd_data_mss`` are caches: they must equal the formula they
    stand for after the SYN that fixed ``_peer_mss`` and ``_ts_ok``, either way round."""
    config = TcpConfig(mss=1380)
    stamp = (5, 0) if timestamps else None
    syn = TcpSegment(4000, 80, 77, 0, SYN, 65535, mss=peer_mss, timestamp=stamp)
    if passive:
        conn = TcpConnection.accept(syn, iss=1, ts_offset=0, now=0.0, config=config)
    else:
        conn = TcpConnection.connect(
            local_port=80, remote_port=4000, iss=1, ts_offset=0, now=0.0, config=config
        )
        conn.segments_to_send(0.0)
        conn.receive(dataclasses.replace(syn, flags=SYN | ACK, ack=2), 0.0)
        assert conn.state is TcpState.ESTABLISHED
    expected = max(64, min(536 if peer_mss is None else peer_mss, config.mss))
    assert conn._snd_mss == conn._send_mss() == expected
    assert conn._snd_data_mss == expected - (12 if timestamps else 0)
    assert conn._data_mss() == conn._snd_data_mss  # nothing held out of order


def test_window_scaling_lets_the_window_exceed_64k() -> None:
    net, a, b = make_net(impairment=Impairment(delay=0.05))
    client, server = establish(net, a, b)
    transfer(net, client, server, 4_000_000, 0)
    assert client._max_snd_wnd > 0xFFFF
    assert server._rcv_cap > 256 * 1024  # receive-window auto-tuning grew the buffer


def test_without_window_scaling_or_sack_or_timestamps() -> None:
    plain = TcpConfig(window_scaling=False, sack=False, timestamps=False)
    net, a, b = make_net(seed=4, impairment=Impairment(loss=0.02), config_b=plain)
    client, server = establish(net, a, b)
    assert not client._wscale_ok and not client._sack_ok and not client._ts_ok
    transfer(net, client, server, 1_000_000, 1_000_000)


def test_syn_retransmission_with_backoff_then_timeout() -> None:
    net, a, b = make_net()
    syn_times: list[float] = []

    def drop_syns(packet: bytes) -> bool:
        ip = parse_ip(packet)
        if ip.payload[13] & SYN:
            syn_times.append(net.now)
            return False
        return True

    net.paths[(id(a), id(b))].filter = drop_syns
    b.listen(80)
    client = a.connect(B, 80, 0.0)
    net.run_until(lambda: client.is_closed, timeout=600)
    gaps = [round(y - x, 3) for x, y in itertools.pairwise(syn_times)]
    assert gaps == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert any(
        isinstance(e, ev.TcpConnectionEvent) and isinstance(e.event, ev.ConnectionTimedOut)
        for e in net.take_events(a)
    )


def test_synack_lost_is_retransmitted() -> None:
    net, a, b = make_net()
    dropped: list[bytes] = []

    def drop_first_synack(packet: bytes) -> bool:
        if parse_ip(packet).payload[13] & SYN and not dropped:
            dropped.append(packet)
            return False
        return True

    net.paths[(id(b), id(a))].filter = drop_first_synack
    client, _server = establish(net, a, b)
    assert dropped and client.state is TcpState.ESTABLISHED
    assert net.now >= 1.0  # waited for the SYN-ACK retransmission timer


def test_rto_backoff_and_abort_after_retry_limit() -> None:
    config = TcpConfig(max_retries=4)
    net, a, b = make_net(config=config)
    client, _server = establish(net, a, b)
    net.paths[(id(a), id(b))].filter = lambda packet: False  # black hole from now on
    client.send(b"x" * 5000)
    start = net.now
    net.run_until(lambda: client.is_closed, timeout=600)
    # 200 ms floor doubled at each of 4 retransmissions, then one more wait: ~6.2 s.
    assert 3.0 < net.now - start < 20.0
    assert any(
        isinstance(e, ev.TcpConnectionEvent) and isinstance(e.event, ev.ConnectionTimedOut)
        for e in net.take_events(a)
    )


def test_fast_retransmit_recovers_without_rto() -> None:
    net, a, b = make_net(impairment=Impairment(delay=0.02))
    client, server = establish(net, a, b)
    seen: list[int] = []

    def drop_one(packet: bytes) -> bool:
        ip = parse_ip(packet)
        seg = parse_tcp(ip.payload, ip.src, ip.dst)
        if seg.payload:
            seen.append(seg.seq)
            if len(seen) == 40:
                return False
        return True

    net.paths[(id(a), id(b))].filter = drop_one
    rto_calls = []
    original = client._on_rto

    def spy(now: float) -> None:
        rto_calls.append(now)
        original(now)

    client._on_rto = spy  # type: ignore[method-assign]
    transfer(net, client, server, 400_000, 0)
    assert not rto_calls
    assert client._ssthresh < 1 << 40  # recovery happened and set ssthresh


def test_sack_blocks_sent_for_out_of_order_data() -> None:
    net, a, b = make_net(impairment=Impairment(delay=0.02))
    client, server = establish(net, a, b)
    sacks: list[tuple[tuple[int, int], ...]] = []
    count = [0]

    def drop_one(packet: bytes) -> bool:
        ip = parse_ip(packet)
        seg = parse_tcp(ip.payload, ip.src, ip.dst)
        if seg.payload:
            count[0] += 1
            return count[0] != 20
        return True

    def watch(packet: bytes) -> bool:
        ip = parse_ip(packet)
        seg = parse_tcp(ip.payload, ip.src, ip.dst)
        if seg.sack_blocks:
            sacks.append(seg.sack_blocks)
        return True

    net.paths[(id(a), id(b))].filter = drop_one
    net.paths[(id(b), id(a))].filter = watch
    transfer(net, client, server, 300_000, 0)
    assert sacks
    assert all(len(blocks) <= 3 for blocks in sacks)  # with timestamps: 3 blocks max


def test_newreno_without_sack_recovers_multiple_losses() -> None:
    plain = TcpConfig(sack=False)
    net, a, b = make_net(seed=8, impairment=Impairment(loss=0.03, delay=0.01), config=plain)
    client, server = establish(net, a, b)
    transfer(net, client, server, 2_000_000, 0)


def test_initial_window_is_ten_segments() -> None:
    net, a, b = make_net(impairment=Impairment(delay=0.1))
    client, _server = establish(net, a, b)
    burst: list[float] = []

    def count(packet: bytes) -> bool:
        if len(packet) > 100:
            burst.append(net.now)
        return True

    net.paths[(id(a), id(b))].filter = count
    client.send(b"z" * 100_000)
    net.run_until(lambda: len(burst) >= 10, timeout=5)
    first = burst[0]
    assert sum(1 for t in burst if t - first < 0.05) == 10


def test_delayed_ack_every_second_segment() -> None:
    config = TcpConfig(quickack_segments=0)
    net, a, b = make_net(impairment=Impairment(delay=0.01), config=config)
    client, server = establish(net, a, b)
    data_segments = [0]
    acks = [0]

    def count_data(packet: bytes) -> bool:
        if len(packet) > 100:
            data_segments[0] += 1
        return True

    def count_acks(packet: bytes) -> bool:
        if len(packet) <= 100:
            acks[0] += 1
        return True

    net.paths[(id(a), id(b))].filter = count_data
    net.paths[(id(b), id(a))].filter = count_acks
    transfer(net, client, server, 1_000_000, 0)
    assert acks[0] <= data_segments[0] * 0.6 + 5


def test_delayed_ack_timer_for_a_single_segment() -> None:
    config = TcpConfig(quickack_segments=0)
    net, a, b = make_net(config=config)
    client, _server = establish(net, a, b)
    client.send(b"one small segment")
    net.step(net.now + 1)  # the segment leaves
    sent_at = net.now
    net.run_until(lambda: client._snd_una == client._snd_max)
    # One-way delay 5 ms each way, plus the 40 ms delayed-ACK timer.
    assert net.now - sent_at >= 0.04


def test_zero_window_persist_probe_then_resume() -> None:
    config = TcpConfig(receive_buffer=64 * 1024, receive_buffer_max=64 * 1024)
    net, a, b = make_net(config=config)
    client, server = establish(net, a, b)
    data = random.Random(1).randbytes(300_000)
    pump = Pump(client, data)
    sink = Pump(server, close_after=False)
    sink.reading = False
    run_pumps(net, [pump, sink], lambda: net.now >= 30, timeout=40)
    assert server._rcv_adv - server._rcv_nxt < 1380  # closed: nothing worth a segment
    assert client._persist_backoff >= 4  # probes went out with exponential backoff
    assert client.state is TcpState.FIN_WAIT_1 and not client.is_closed
    sink.reading = True
    run_pumps(net, [pump, sink], lambda: sink.eof, timeout=120)
    assert sink.hasher.digest() == hashlib.sha256(data).digest()


def test_silly_window_avoidance_no_tiny_segments() -> None:
    config = TcpConfig(receive_buffer=64 * 1024, receive_buffer_max=64 * 1024)
    net, a, b = make_net(config=config)
    client, server = establish(net, a, b)
    sizes: list[int] = []

    def record(packet: bytes) -> bool:
        ip = parse_ip(packet)
        payload = len(parse_tcp(ip.payload, ip.src, ip.dst).payload)
        if payload:
            sizes.append(payload)
        return True

    net.paths[(id(a), id(b))].filter = record
    data = random.Random(2).randbytes(400_000)
    pump, sink = Pump(client, data), Pump(server)

    def slow_reader() -> bool:
        # The application reads 100 bytes at a time: the window opens in tiny steps.
        chunk = server.read(100)
        sink.hasher.update(chunk)
        sink.received_len += len(chunk)
        return sink.received_len == len(data)

    sink.reading = False
    run_pumps(net, [pump, sink], slow_reader, timeout=3000)
    assert sink.hasher.digest() == hashlib.sha256(data).digest()
    small = [s for s in sizes if s < 500]
    assert len(small) <= 2  # at most the tail of the stream


def test_half_close_each_direction_independently() -> None:
    net, a, b = make_net()
    client, server = establish(net, a, b)
    client.send(b"request")
    client.close()  # client -> server finished; server can still talk
    net.run_until(lambda: client.state is TcpState.FIN_WAIT_2)
    assert server.read() == b"request" and server.at_eof
    assert server.state is TcpState.CLOSE_WAIT
    for _ in range(5):
        server.send(b"response " * 1000)
    net.run_until(lambda: client.readable_bytes == 45_000)
    server.close()
    net.run_until(lambda: client.at_eof or (client._eof and client.readable_bytes == 45_000))
    assert client.read() == b"response " * 5000
    assert client.state is TcpState.TIME_WAIT
    net.run_until(lambda: server.is_closed)
    net.run_until(lambda: client.is_closed, timeout=120)  # 60 s of TIME-WAIT


def test_simultaneous_close() -> None:
    net, a, b = make_net(impairment=Impairment(delay=0.05))
    client, server = establish(net, a, b)
    client.close()
    server.close()
    net.run_until(lambda: client.state is TcpState.TIME_WAIT and server.state is TcpState.TIME_WAIT)


def test_time_wait_reacks_a_retransmitted_fin() -> None:
    net, a, b = make_net()
    client, server = establish(net, a, b)
    client.close()
    net.run_until(lambda: client.state is TcpState.FIN_WAIT_2)
    server.close()
    net.run_until(lambda: client.state is TcpState.TIME_WAIT and server.is_closed)
    fin = TcpSegment(
        server.local_port,
        server.remote_port,
        (server._iss + server._fin_offset) & 0xFFFFFFFF,  # type: ignore[operator]
        (server._irs + server._rcv_nxt) & 0xFFFFFFFF,
        FIN | ACK,
        100,
    )
    client.receive(fin, net.now)
    assert [s.flags for s in client.segments_to_send(net.now)] == [ACK]


def test_rst_for_closed_port_and_refused_event() -> None:
    net, a, b = make_net()
    client = a.connect(B, 9, 0.0)
    net.run_until(lambda: client.is_closed, timeout=5)
    events = [e.event for e in net.take_events(a) if isinstance(e, ev.TcpConnectionEvent)]
    assert ev.ConnectionReset(refused=True) in events
    assert b.counters["tcp_reset_sent"] == 1


def test_abort_sends_rst_and_peer_resets() -> None:
    net, a, b = make_net()
    client, server = establish(net, a, b)
    client.abort()
    net.run_until(lambda: server.is_closed, timeout=5)
    events = [e.event for e in net.take_events(b) if isinstance(e, ev.TcpConnectionEvent)]
    assert ev.ConnectionReset() in events


def _inject(net: Network, into: Stack, src: str, dst: str, seg: TcpSegment) -> None:
    from netstack.ip import build_ip

    s, d = pack_address(src), pack_address(dst)
    into.receive_packet(build_ip(s, d, PROTO_TCP, build_tcp(seg, s, d)), net.now)


def test_rfc5961_in_window_rst_gets_challenge_ack() -> None:
    net, a, b = make_net()
    client, server = establish(net, a, b)
    rcv = (server._irs + server._rcv_nxt) & 0xFFFFFFFF
    out: list[bytes] = []
    # In the window but not exactly RCV.NXT: challenge ACK, connection survives.
    bogus = TcpSegment(client.local_port, 80, (rcv + 1000) & 0xFFFFFFFF, 0, RST, 0)
    _inject(net, b, A, B, bogus)
    out = b.packets_to_send(net.now)
    assert len(out) == 1
    ip = parse_ip(out[0])
    assert parse_tcp(ip.payload, ip.src, ip.dst).flags == ACK
    assert server.state is TcpState.ESTABLISHED
    # A SYN on an established connection: challenge ACK as well (RFC 5961 section 4).
    _inject(net, b, A, B, TcpSegment(client.local_port, 80, rcv, 0, SYN, 1000))
    assert len(b.packets_to_send(net.now)) == 1 and server.state is TcpState.ESTABLISHED
    # Exactly RCV.NXT: reset.
    _inject(net, b, A, B, TcpSegment(client.local_port, 80, rcv, 0, RST, 0))
    b.packets_to_send(net.now)
    assert server.is_closed


def test_rfc5961_ack_beyond_snd_nxt_is_dropped() -> None:
    net, a, b = make_net()
    client, server = establish(net, a, b)
    rcv = (server._irs + server._rcv_nxt) & 0xFFFFFFFF
    future = (server._iss + 10_000_000) & 0xFFFFFFFF
    _inject(net, b, A, B, TcpSegment(client.local_port, 80, rcv, future, ACK, 100, b"x"))
    assert server.readable_bytes == 0  # dropped, only an ACK back
    assert len(b.packets_to_send(net.now)) == 1


def test_paws_drops_old_timestamps() -> None:
    net, a, b = make_net()
    client, server = establish(net, a, b)
    rcv = (server._irs + server._rcv_nxt) & 0xFFFFFFFF
    ack = (server._iss + server._snd_nxt) & 0xFFFFFFFF
    old = (server._ts_recent - 1000) & 0xFFFFFFFF
    seg = TcpSegment(client.local_port, 80, rcv, ack, ACK, 100, b"stale", timestamp=(old, 0))
    _inject(net, b, A, B, seg)
    assert server.readable_bytes == 0


def test_keepalive_probes_then_timeout() -> None:
    config = TcpConfig(keepalive_idle=10.0, keepalive_interval=1.0, keepalive_count=3)
    net, a, b = make_net(config=config)
    client, _server = establish(net, a, b)
    net.run_until(lambda: net.now > 30, timeout=40)  # peer answers probes: still alive
    assert client.state is TcpState.ESTABLISHED
    net.paths[(id(b), id(a))].filter = lambda packet: False
    net.run_until(lambda: client.is_closed, timeout=60)


def test_listen_backlog_drops_excess_syns() -> None:
    net, a, b = make_net()
    listener = b.listen(80, backlog=2)
    clients = [a.connect(B, 80, 0.0) for _ in range(4)]
    net.run_until(lambda: listener.pending == 2, timeout=5)
    assert b.counters["tcp_syn_dropped_backlog"] >= 2
    while listener.accept() is not None:
        pass
    net.run_until(lambda: all(c.state is TcpState.ESTABLISHED for c in clients), timeout=30)


def test_isn_comes_from_the_injected_rng() -> None:
    _, a1, _ = make_net(seed=5)
    _, a2, _ = make_net(seed=5)
    c1 = a1.connect(B, 80, 0.0)
    c2 = a2.connect(B, 80, 0.0)
    assert c1._iss == c2._iss and c1.local_port == c2.local_port
    _, a3, _ = make_net(seed=6)
    assert a3.connect(B, 80, 0.0)._iss != c1._iss


def test_many_connections_one_deadline() -> None:
    net, a, b = make_net(impairment=Impairment(loss=0.01))
    listener = b.listen(80, backlog=500)
    clients = [a.connect(B, 80, 0.0) for _ in range(300)]
    pumps = [Pump(c, i.to_bytes(2, "big") * 2500) for i, c in enumerate(clients)]
    sinks: list[Pump] = []

    def accept_and_check() -> bool:
        while (conn := listener.accept()) is not None:
            sinks.append(Pump(conn))
        for sink in sinks:
            sink.service()
        return len(sinks) == 300 and all(s.eof for s in sinks)

    run_pumps(net, pumps, accept_and_check, timeout=120)
    assert sorted(bytes(s.received) for s in sinks) == sorted(
        i.to_bytes(2, "big") * 2500 for i in range(300)
    )


def test_memory_bounded_out_of_order_queue() -> None:
    config = TcpConfig(receive_buffer=64 * 1024, receive_buffer_max=64 * 1024)
    net, a, b = make_net(config=config)
    client, server = establish(net, a, b)
    rcv = server._irs + server._rcv_nxt
    ack = (server._iss + server._snd_nxt) & 0xFFFFFFFF
    for i in range(2000):  # far more out-of-order data than the window
        seq = (rcv + 1000 + i * 1000) & 0xFFFFFFFF
        seg = TcpSegment(client.local_port, 80, seq, ack, ACK, 100, b"q" * 1000)
        _inject(net, b, A, B, seg)
    assert server._ooo_bytes <= 64 * 1024
    assert len(server._ooo_ranges) <= 64


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TcpConfig().mss = 1  # type: ignore[misc]


def test_eifel_undo_of_spurious_fast_retransmits_under_reordering() -> None:
    # Reordering only (no loss): every fast retransmit is spurious, and timestamps
    # prove it (RFC 3522), so the window reduction is undone.
    net, a, b = make_net(seed=21, impairment=Impairment(reorder=0.05, reorder_delay=0.05))
    client, server = establish(net, a, b)
    transfer(net, client, server, 3_000_000, 0)
    assert client.stats_recoveries > 0
    assert client.stats_undo > 0
    assert client.stats_rto == 0


def test_new_syn_reuses_a_four_tuple_in_time_wait() -> None:
    net, a, b = make_net()
    client, server = establish(net, a, b)
    server.close()  # the server closes first: it holds TIME-WAIT
    net.run_until(lambda: client.state is TcpState.CLOSE_WAIT)
    client.close()
    net.run_until(lambda: server.state is TcpState.TIME_WAIT and client.is_closed)
    # A new connection from the same port (as a busy kernel client may pick).
    listener = b._listeners[80]
    again = a.connect(B, 80, net.now)
    old_key = a._keys[again]
    a._forget(again, old_key)
    key = (old_key[0], client.local_port, old_key[2], old_key[3])
    a._register(again, key)
    again.local_port = client.local_port
    net.run_until(lambda: listener.pending == 1, timeout=0.5)  # at once, no 1 s SYN retry
    assert again.state is TcpState.ESTABLISHED
    assert b.connection_count == 1  # the TIME-WAIT incarnation is gone


def test_tail_loss_probe_recovers_a_lost_tail_without_rto() -> None:
    net, a, b = make_net(impairment=Impairment(delay=0.02))
    client, server = establish(net, a, b)
    total = 100_000
    dropped: list[int] = []

    def drop_the_last_segments_once(packet: bytes) -> bool:
        ip = parse_ip(packet)
        seg = parse_tcp(ip.payload, ip.src, ip.dst)
        end = (seg.seq - client._iss + len(seg.payload)) & 0xFFFFFFFF
        if seg.payload and end > total - 3000 and not client.stats_tlp:
            dropped.append(end)  # the last segments as first sent: nothing above is SACKed
            return False
        return True

    net.paths[(id(a), id(b))].filter = drop_the_last_segments_once
    pump, sink = Pump(client, random.Random(3).randbytes(total), close_after=False), Pump(server)
    run_pumps(net, [pump, sink], lambda: sink.received_len == total, timeout=30)
    assert len(dropped) == 4
    assert client.stats_tlp >= 1
    assert client.stats_rto == 0


@pytest.mark.parametrize("algorithm", ["cubic", "newreno"])
def test_congestion_control_cubic_and_newreno_transfer_with_loss(algorithm: str) -> None:
    config = TcpConfig(congestion_control=algorithm)
    net, a, b = make_net(seed=31, impairment=Impairment(loss=0.02, delay=0.01), config=config)
    client, server = establish(net, a, b)
    transfer(net, client, server, 2_000_000, 1_000_000, seed=31)
    assert client._cc.name == server._cc.name == algorithm
    assert client.stats_recoveries > 0


def test_cubic_beats_newreno_on_a_lossy_path() -> None:
    # Same seed, same path: CUBIC's gentler reduction (beta 0.7) and its cubic
    # regrowth move the same bytes in less virtual time.
    elapsed = {}
    for algorithm in ("cubic", "newreno"):
        config = TcpConfig(congestion_control=algorithm)
        net, a, b = make_net(seed=32, impairment=Impairment(loss=0.01, delay=0.02), config=config)
        client, server = establish(net, a, b)
        start = net.now
        transfer(net, client, server, 4_000_000, 0, seed=32)
        elapsed[algorithm] = net.now - start
    assert elapsed["cubic"] < elapsed["newreno"]


def reordering_run(monkeypatch: pytest.MonkeyPatch, adaptive: bool) -> TcpConnection:
    if not adaptive:
        monkeypatch.setattr("netstack.tcpsend._MAX_REORDERING", 3)
    net, a, b = make_net(
        seed=21,
        impairment=Impairment(reorder=0.05, reorder_delay=0.05),
        config=TcpConfig(rack=False),
    )
    client, server = establish(net, a, b)
    transfer(net, client, server, 3_000_000, 0)
    return client


def test_reordering_raises_the_duplicate_ack_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback where RACK does not run (rack=False, or no SACK): once a late
    # segment fills a hole that was never re-sent, fast retransmit waits for as many
    # duplicate ACKs / SACKed segments as the reordering seen (RFC 4653's idea, Linux's
    # tp->reordering), so far fewer spurious recoveries.
    adaptive = reordering_run(monkeypatch, adaptive=True)
    assert adaptive.stats_reordering > 0
    assert adaptive._reordering > 3
    fixed = reordering_run(monkeypatch, adaptive=False)
    assert fixed._reordering == 3
    assert adaptive.stats_recoveries * 3 < fixed.stats_recoveries * 2


@pytest.mark.parametrize(
    "impairment",
    [
        Impairment(loss=0.01, delay=0.01),
        Impairment(delay=0.01, bandwidth=2_000_000, queue_limit=60_000),
    ],
    ids=["loss", "bottleneck"],
)
def test_loss_alone_is_not_taken_for_reordering(impairment: Impairment) -> None:
    net, a, b = make_net(seed=21, impairment=impairment)
    client, server = establish(net, a, b)
    transfer(net, client, server, 3_000_000, 0)
    assert client.stats_retransmitted > 0
    assert client._reordering == 3


def test_drop_tail_bottleneck_costs_few_retransmissions() -> None:
    # Slow start overshoots a 60 KB drop-tail queue.  After the RTO that follows, the
    # re-sent data is still queued at the bottleneck: no fast recovery may start on
    # those holes until it is all acknowledged (RFC 6582 section 4.1, Linux's Loss
    # state), or each hole is sent a third time and the "spurious" undo misfires.
    imp = Impairment(delay=0.01, bandwidth=2_000_000, queue_limit=60_000)
    net, a, b = make_net(seed=21, impairment=imp)
    client, server = establish(net, a, b)
    start = net.now
    transfer(net, client, server, 3_000_000, 0)
    drops = net.paths[(id(a), id(b))].stats.queue_drops
    assert drops > 0
    assert client.stats_retransmitted < 2 * drops + 20
    assert client.stats_undo == 0
    assert net.now - start < 1.5 * 3_000_000 / 2_000_000 + 1.0


def test_sack_scoreboard_stays_sorted_and_merged() -> None:
    net, a, b = make_net()
    client, _server = establish(net, a, b)
    client._snd_una, client._snd_max = 1, 100_001
    iss = client._iss

    def wire(offset: int) -> int:
        return (iss + offset) & 0xFFFFFFFF

    assert client._update_scoreboard(((wire(5001), wire(7001)), (wire(1001), wire(3001))), 0.0)
    assert client._sacked == [(1001, 3001), (5001, 7001)]
    # Blocks already known change nothing and leave no trace.
    assert not client._update_scoreboard(((wire(5001), wire(7001)), (wire(1501), wire(2001))), 0.0)
    assert client._sacked == [(1001, 3001), (5001, 7001)]
    assert client._update_scoreboard(((wire(3001), wire(5001)),), 0.0)
    assert client._sacked == [(1001, 7001)]


def _acks_for_first_segments(config: TcpConfig | None, segments: int) -> int:
    """Pure ACKs the receiver sends for the first ``segments`` data segments, which a
    1 MB/s bottleneck delivers one at a time."""
    net, a, b = make_net(impairment=Impairment(bandwidth=1_000_000), config=config)
    client, _server = establish(net, a, b)
    data, acks = [0], [0]

    def count_data(packet: bytes) -> bool:
        data[0] += len(packet) > 100
        return True

    def count_acks(packet: bytes) -> bool:
        acks[0] += len(packet) <= 100
        return True

    net.paths[(id(a), id(b))].filter = count_data
    net.paths[(id(b), id(a))].filter = count_acks
    client.send(b"q" * 1368 * segments)
    net.run_until(lambda: client.bytes_in_send_buffer == 0, timeout=2)
    assert data[0] == segments
    return acks[0]


def test_quick_ack_at_start_then_every_second_segment() -> None:
    """Quick-ACK mode (Linux's): the first segments of a connection are each ACKed at
    once so the peer's slow start is not held back; afterwards every second one."""
    assert _acks_for_first_segments(None, 8) >= 8
    assert _acks_for_first_segments(TcpConfig(quickack_segments=0), 8) <= 5


def test_karn_no_rtt_sample_from_a_retransmission() -> None:
    """Without timestamps an ACK of retransmitted data is ambiguous (RFC 6298 section
    3, Karn's rule): the time until the RTO must not become an RTT sample."""
    config = TcpConfig(timestamps=False, tail_loss_probe=False)
    net, a, b = make_net(config=config)
    client, _server = establish(net, a, b)
    srtt_before = client._srtt
    assert srtt_before is not None and srtt_before < 0.05
    dropped = [0]

    def drop_first(packet: bytes) -> bool:
        if len(packet) > 100 and not dropped[0]:
            dropped[0] = 1
            return False
        return True

    net.paths[(id(a), id(b))].filter = drop_first
    client.send(b"k" * 1000)
    net.run_until(lambda: client.bytes_in_send_buffer == 0, timeout=10)
    assert client.stats_rto == 1
    assert client._srtt == srtt_before  # the only segment timed was re-sent: no sample


def test_nagle_off_small_writes_leave_while_data_is_in_flight() -> None:
    """Nagle's algorithm is off (TCP_NODELAY, as a proxy wants): a small write goes out
    at once even while earlier data is unacknowledged."""
    net, a, b = make_net()
    client, _server = establish(net, a, b)
    client.notify = None
    client.send(b"first")
    first = client.segments_to_send(net.now)
    client.send(b"second")
    second = client.segments_to_send(net.now)
    assert [s.payload for s in first] == [b"first"]
    assert [s.payload for s in second] == [b"second"]
    assert client._snd_una < client._snd_max


def test_receive_window_auto_tuning_grows_the_buffer() -> None:
    """A reader that keeps up makes the receive buffer (and so the advertised window)
    grow from its initial size towards ``receive_buffer_max`` (like Linux's DRS)."""
    config = TcpConfig(receive_buffer=64 * 1024, receive_buffer_max=4 * 1024 * 1024)
    net, a, b = make_net(impairment=Impairment(delay=0.02), config=config)
    client, server = establish(net, a, b)
    assert server._rcv_cap == 64 * 1024
    transfer(net, client, server, 6_000_000, 0)
    assert server._rcv_cap >= 512 * 1024
    assert client._max_snd_wnd > 64 * 1024
