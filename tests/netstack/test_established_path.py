"""The established-state hot path (``speedups.tcp_receive_established``, Cython or its
twin) must be invisible: the same packets, byte for byte, as the general path."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from netstack import _pure, speedups, stack, tcp, tcpsend
from netstack.speedups import build_tcp_packet
from netstack.tcp import TcpConnection, TcpState
from netstack.tcpwire import ACK, FIN, PSH, RST, SYN, TcpSegment
from tests.netstack.netsim import Impairment
from tests.netstack.test_speedups import fast
from tests.netstack.test_tcp_sim import establish, make_net, transfer, wait_closed

SCENARIOS = {
    "clean": Impairment(),
    "loss": Impairment(loss=0.02, delay=0.01),
    "reorder": Impairment(reorder=0.1, reorder_delay=0.02),
    "duplicate": Impairment(duplicate=0.05),
    "everything": Impairment(loss=0.02, duplicate=0.02, reorder=0.05, delay=0.01),
    "bottleneck": Impairment(delay=0.01, bandwidth=2_000_000, queue_limit=60_000),
}


def traced_transfer(impairment: Impairment, seed: int) -> tuple[list[bytes], float, list[Any]]:
    net, a, b = make_net(seed=seed, impairment=impairment)
    trace: list[bytes] = []
    for path in net.paths.values():

        def record(packet: bytes) -> bool:
            trace.append(packet)
            return True

        path.filter = record
    client, server = establish(net, a, b)
    transfer(net, client, server, 600_000, 400_000, seed=seed)
    wait_closed(net, client, server)
    # Every field of both connections at the end, counters and congestion state too.
    return trace, net.now, [state_of(c) | {"cc": c._cc.snapshot()} for c in (client, server)]


def general_receive_run(packets: list[bytes], start: int, *_: Any) -> tuple[int, Any]:
    """``tcp_receive_run`` that takes nothing: every packet to the general path."""
    return start, speedups.parse_tcp_packet(packets[start], TcpSegment)


def general_send_run(conn: Any, template: Any, out: Any, pipe: int, *_: Any) -> tuple[int, int]:
    """``tcp_send_run`` that sends nothing: every segment from ``_transmit``'s loop."""
    return 0, pipe


def general_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every hot path off: the Stack's packet run, the connection's established-state
    path and ``_transmit``'s send run."""
    monkeypatch.setattr(stack, "receive_tcp_run", general_receive_run)
    monkeypatch.setattr(tcp, "receive_established", lambda conn, seg, now: False)
    monkeypatch.setattr(tcpsend, "send_run", general_send_run)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_packets_with_and_without_the_hot_path(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = sent = 0
    real_run, real_send = speedups.tcp_receive_run, speedups.tcp_send_run

    def counting_run(packets: list[bytes], start: int, *rest: Any) -> tuple[int, Any]:
        nonlocal taken
        index, parsed = real_run(packets, start, *rest)
        taken += index - start
        return index, parsed

    def counting_send(*args: Any) -> tuple[int, int]:
        nonlocal sent
        count, pipe = real_send(*args)
        sent += count
        return count, pipe

    monkeypatch.setattr(stack, "receive_tcp_run", counting_run)
    monkeypatch.setattr(tcpsend, "send_run", counting_send)
    fast = traced_transfer(SCENARIOS[name], seed=41)
    general_only(monkeypatch)
    general = traced_transfer(SCENARIOS[name], seed=41)
    assert fast[1:] == general[1:]
    assert len(fast[0]) == len(general[0])
    assert fast[0] == general[0]
    # On a clean path they carry the bulk of the traffic; with reordering and loss
    # much of it is recovery and reassembly, which the general path keeps.
    assert taken > (len(fast[0]) // 2 if name == "clean" else 50)
    assert sent > (len(fast[0]) // 4 if name == "clean" else 50)


def connected_pair() -> tuple[TcpConnection, TcpConnection, Any]:
    net, a, b = make_net(seed=5)
    client, server = establish(net, a, b)
    pump = random.Random(5).randbytes(50_000)
    client.send(pump)
    net.run_until(lambda: server.readable_bytes >= 10_000, timeout=10)
    assert server.state is TcpState.ESTABLISHED
    return client, server, net


def state_of(conn: TcpConnection) -> dict[str, Any]:
    return {
        k: copy.copy(v)
        for k, v in vars(conn).items()
        if k not in ("_sndbuf", "_cc", "config", "notify", "_events", "_control")
    } | {"events": list(conn._events), "sndbuf": conn.bytes_in_send_buffer}


def in_order(conn: TcpConnection, **changes: Any) -> TcpSegment:
    """The segment the hot path would take: next in order, ACK only, acking nothing new."""
    fields: dict[str, Any] = {
        "src_port": conn.remote_port,
        "dst_port": conn.local_port,
        "seq": (conn._irs + conn._rcv_nxt) & 0xFFFFFFFF,
        "ack": (conn._iss + conn._snd_una) & 0xFFFFFFFF,
        "flags": ACK | PSH,
        "window": conn._snd_wnd >> conn._snd_wscale,
        "payload": b"x" * 100,
        "timestamp": (conn._ts_recent + 1, 0) if conn._ts_ok else None,
    }
    fields.update(changes)
    return TcpSegment(**fields)


def declined_cases(conn: TcpConnection) -> dict[str, TcpSegment]:
    seq = (conn._irs + conn._rcv_nxt) & 0xFFFFFFFF
    ack = (conn._iss + conn._snd_una) & 0xFFFFFFFF
    return {
        "fin": in_order(conn, flags=ACK | FIN),
        "syn": in_order(conn, flags=ACK | SYN),
        "rst": in_order(conn, flags=ACK | RST),
        "no ack": in_order(conn, flags=PSH),
        "sack blocks": in_order(conn, sack_blocks=((seq + 1000, seq + 2000),)),
        "out of order": in_order(conn, seq=(seq + 1000) & 0xFFFFFFFF),
        "old data": in_order(conn, seq=(seq - 50) & 0xFFFFFFFF),
        "paws": in_order(conn, timestamp=((conn._ts_recent - 10) & 0xFFFFFFFF, 0)),
        "beyond the window": in_order(conn, payload=b"y" * (conn._rcv_adv - conn._rcv_nxt + 1)),
        "old ack": in_order(conn, ack=(ack - 1) & 0xFFFFFFFF),
        "ack of unsent data": in_order(conn, ack=(conn._iss + conn._snd_max + 1) & 0xFFFFFFFF),
    }


def test_declined_segments_change_nothing() -> None:
    _client, server, _net = connected_pair()
    for name, seg in declined_cases(server).items():
        before = state_of(server)
        assert not speedups.tcp_receive_established(server, seg, 1000.0), name
        assert state_of(server) == before, name


def test_duplicate_ack_is_declined() -> None:
    client, _server, net = connected_pair()
    client.send(b"z" * 5000)
    client.segments_to_send(net.now)  # in flight: SND.MAX > SND.UNA
    assert client._snd_max > client._snd_una
    seg = in_order(client, payload=b"")
    client._snd_wnd = seg.window << client._snd_wscale  # the same window: a duplicate
    before = state_of(client)
    assert not speedups.tcp_receive_established(client, seg, net.now)
    assert state_of(client) == before
    # The same ACK carrying data, or a new window, is the hot path's again.
    assert speedups.tcp_receive_established(client, in_order(client), net.now)


def test_recovery_and_reassembly_go_to_the_general_path() -> None:
    client, server, _net = connected_pair()
    for attribute, value in (
        ("_in_recovery", True),
        ("_sacked", [(1, 2)]),
        ("_dupacks", 1),
        ("_undo_pending", True),
        ("_ooo", {1: b"x"}),
    ):
        conn = server if attribute == "_ooo" else client
        saved = getattr(conn, attribute)
        setattr(conn, attribute, value)
        try:
            assert not speedups.tcp_receive_established(conn, in_order(conn), 1000.0), attribute
        finally:
            setattr(conn, attribute, saved)
    assert speedups.tcp_receive_established(server, in_order(server), 1000.0)


def perturbed(base: TcpConnection, rng: random.Random) -> TcpConnection:
    conn = copy.deepcopy(base)
    conn._tlp_out = rng.random() < 0.3
    conn._send_blocked = rng.random() < 0.3
    conn._quickack = rng.choice([0, 0, 1, 5])
    conn._ack_pending = rng.choice([0, 1])
    if rng.random() < 0.3:
        conn._rtt_seq = conn._snd_una + rng.randrange(0, 3000)
        conn._rtt_time = 0.001
    if rng.random() < 0.2:
        conn._ssthresh = conn._cwnd  # congestion avoidance: the controller's on_ack
    if rng.random() < 0.3 and conn.state is TcpState.ESTABLISHED:
        conn.close()  # FIN-WAIT-1, our FIN at the end of the queued bytes
        conn.segments_to_send(0.05)
    if rng.random() < 0.2:
        conn._discard_input = True
    return conn


def random_segment(conn: TcpConnection, rng: random.Random) -> TcpSegment:
    seq = conn._rcv_nxt + rng.choice([0, 0, 0, 0, -100, 1448, rng.randrange(-3000, 3000)])
    ack = rng.randrange(conn._snd_una - 2, conn._snd_max + 3)
    if rng.random() < 0.5:
        ack = rng.choice([conn._snd_una, conn._snd_max, conn._snd_max - 1])
    flags = rng.choice([ACK, ACK | PSH, ACK | PSH, ACK, ACK | FIN, PSH, ACK | RST, ACK | 0x20])
    window = rng.choice([conn._snd_wnd >> conn._snd_wscale, 0, rng.randrange(0, 65536)])
    timestamp = None
    if conn._ts_ok and rng.random() < 0.95:
        tsval = (conn._ts_recent + rng.choice([0, 1, 5, -3, 1 << 31])) & 0xFFFFFFFF
        tsecr = rng.choice([0, conn._ts_now(0.05), conn._ts_now(0.02)])
        timestamp = (tsval, tsecr)
    sack: tuple[tuple[int, int], ...] = ()
    if rng.random() < 0.05:
        sack = (
            (conn._iss + conn._snd_una + 1) & 0xFFFFFFFF,
            (conn._iss + conn._snd_una + 9) & 0xFFFFFFFF,
        )
        sack = (sack,)
    return TcpSegment(
        conn.remote_port,
        conn.local_port,
        (conn._irs + seq) & 0xFFFFFFFF,
        (conn._iss + ack) & 0xFFFFFFFF,
        flags,
        window,
        rng.randbytes(rng.choice([0, 0, 1, 100, 1448])),
        timestamp=timestamp,
        sack_blocks=sack,
    )


def test_differential_random_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random segments on randomly perturbed connections: the hot path (or its refusal
    followed by the general path) leaves exactly the state the general path leaves."""
    client, server, net = connected_pair()
    client.send(b"q" * 20_000)
    client.segments_to_send(net.now)
    bases = [client, server]
    for conn in bases:
        conn.notify = None
    rng = random.Random(2024)
    real = speedups.tcp_receive_established
    taken = 0
    for case in range(3000):
        base = rng.choice(bases)
        fast = perturbed(base, random.Random(case))
        general = perturbed(base, random.Random(case))
        seg = random_segment(fast, rng)
        now = 0.05 + rng.random() * 0.01
        monkeypatch.setattr(tcp, "receive_established", real)
        taken += real(copy.deepcopy(fast), seg, now)
        fast.receive(seg, now)
        monkeypatch.setattr(tcp, "receive_established", lambda conn, seg, now: False)
        general.receive(seg, now)
        assert state_of(fast) | {"cc": fast._cc.snapshot()} == state_of(general) | {
            "cc": general._cc.snapshot()
        }, (case, seg)
        assert fast.segments_to_send(now) == general.segments_to_send(now), case
    assert taken > 300


def twins() -> list[Any]:
    """The Cython module and its pure twin (both, whichever the switch selects)."""
    return [fast(), _pure]


def random_packets(
    conn: TcpConnection, local: bytes, remote: bytes, rng: random.Random, count: int
) -> list[bytes]:
    """Mostly the hot path's segments (next in order, data or pure ACK), with random
    segments, mangled copies and other ports mixed in."""
    packets = []
    offset = 0
    for _ in range(count):
        roll = rng.random()
        if roll < 0.9:
            seg = in_order(conn, payload=rng.randbytes(rng.choice([0, 1, 100, 1000])))
            seg.seq = (seg.seq + offset) & 0xFFFFFFFF
            offset += len(seg.payload)
        else:
            seg = random_segment(conn, rng)
            seg.flags &= ~(RST | FIN)  # keep the connection established
        if rng.random() < 0.05:  # the same addresses, another connection's ports
            if rng.random() < 0.5:
                seg.dst_port ^= 1
            else:
                seg.src_port ^= 1
            offset -= len(seg.payload) if roll < 0.9 else 0
        packet = build_tcp_packet(seg, remote, local)
        packets.append(packet)
        if rng.random() < 0.1:  # a mangled copy as well
            mangled = bytearray(packet)
            mangled[rng.randrange(len(packet))] ^= 1 << rng.randrange(8)
            packets.append(bytes(mangled[: rng.choice([len(packet), rng.randrange(len(packet))])]))
    return packets


def test_receive_run_twins_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same random packets into two identical stacks, one taking them through the
    Cython run, one through its twin: the same connection state and the same output,
    with the same packets taken (and the rest left in the same place)."""
    results = []
    for module in twins():
        monkeypatch.setattr(stack, "receive_tcp_run", speedups.tcp_receive_run)
        _client, server, net = connected_pair()
        host = next(s for s in net.unique_stacks() if server in s._keys)
        local, _, remote, _ = host._keys[server]
        taken: list[int] = []

        def run(
            packets: list[bytes], start: int, *rest: Any, module: Any = module, taken: Any = taken
        ) -> Any:
            index, parsed = module.tcp_receive_run(packets, start, *rest)
            taken.append(index - start)
            return index, parsed

        monkeypatch.setattr(stack, "receive_tcp_run", run)
        rng = random.Random(77)
        out = []
        now = net.now
        for _ in range(40):
            now += 0.001
            host.receive_packets(random_packets(server, local, remote, rng, 25), now)
            out.append(host.packets_to_send(now))
            out.append([getattr(e, "event", e) for e in host.events()])
            server.read(rng.choice([500, -1, -1]))
        results.append((taken, out, state_of(server), dict(host.counters)))
    for part in range(4):
        assert results[0][part] == results[1][part], part
    assert sum(results[0][0]) > 250


def sending_connection(rng: random.Random) -> TcpConnection:
    """A connected client with data queued in writes of mixed sizes (chunks and tail)
    and the send-side fields perturbed."""
    client, _server, _net = connected_pair()
    client.notify = None
    for _ in range(rng.randrange(1, 12)):
        client.send(rng.randbytes(rng.choice([1, 700, 1448, 5000, 70_000])))
    if rng.random() < 0.3:
        client.close()
    client._cwnd = rng.choice([1448, 14480, 10**6, rng.randrange(0, 200_000)])
    client._snd_wnd = rng.choice([0, 3000, 65535 << 7, rng.randrange(0, 300_000)])
    client._max_snd_wnd = max(client._snd_wnd, rng.randrange(0, 300_000))
    if rng.random() < 0.2:
        client._rtt_seq = None
    return client


def test_send_run_twins_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_transmit`` with the Cython send run, with its twin and with neither on
    copies of randomly perturbed connections: the same segments, the same state; and
    ``packets_to_send`` (runs built straight into packets, IPv4 and IPv6) the same
    packets as the segments built one by one."""
    emitted = 0
    for case in range(60):
        base = sending_connection(random.Random(case))
        v6 = case % 2 == 1
        local, remote = (
            (bytes(range(16)), bytes(range(16, 32))) if v6 else (b"\n\0\0\1", b"\n\0\0\2")
        )
        outcomes = []
        for send in [*(m.tcp_send_run for m in twins()), None]:
            monkeypatch.setattr(tcpsend, "send_run", send or general_send_run)
            for as_packets in (False, True):
                conn = copy.deepcopy(base)
                packets = []
                for step in range(4):
                    now = 0.06 + step * 0.01
                    if as_packets:
                        packets.append(conn.packets_to_send(now, local, remote))
                    else:
                        built = [
                            build_tcp_packet(seg, local, remote)
                            for seg in conn.segments_to_send(now)
                        ]
                        packets.append(built)
                    conn._snd_wnd += 20_000
                    conn._cwnd += 30_000
                outcomes.append((packets, state_of(conn)))
        assert all(outcome == outcomes[0] for outcome in outcomes), case
        emitted += sum(len(step) for step in outcomes[0][0])
    assert emitted > 1000
