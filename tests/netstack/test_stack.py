"""The Stack: demultiplexing, UDP, ICMP, resets, counters, and fuzzing a live stack."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import Raw

from netstack import events as ev
from netstack.ip import build_ipv4, pack_address
from netstack.stack import Stack, StackError
from netstack.tcp import TcpState
from netstack.tcpwire import ACK, TcpSegment, build_tcp

US4, THEM4 = "10.1.0.2", "10.1.0.1"
US6, THEM6 = "fd01::2", "fd01::1"


def make_stack(seed: int = 1) -> Stack:
    return Stack([US4, US6], mtu=1500, rng=random.Random(seed))


def test_icmp_echo_v4_and_v6() -> None:
    stack = make_stack()
    stack.receive_packet(bytes(IP(src=THEM4, dst=US4) / ICMP(id=1, seq=2) / Raw(b"hi")), 0.0)
    stack.receive_packet(
        bytes(IPv6(src=THEM6, dst=US6) / ICMPv6EchoRequest(id=3, seq=4, data=b"yo")), 0.0
    )
    out = stack.packets_to_send()
    reply4, reply6 = IP(out[0]), IPv6(out[1])
    assert reply4[ICMP].type == 0 and bytes(reply4[ICMP].payload) == b"hi"
    assert reply4.dst == THEM4 and reply4.src == US4
    assert isinstance(reply6.payload, ICMPv6EchoReply) and reply6.payload.data == b"yo"


def test_udp_datagram_event_and_reply() -> None:
    stack = make_stack()
    sock = stack.bind(5353)
    stack.receive_packet(bytes(IP(src=THEM4, dst=US4) / UDP(sport=999, dport=5353) / b"q"), 1.0)
    events = stack.events()
    assert events == [ev.UdpDatagramReceived(5353, US4, THEM4, 999, b"q")]
    sock.sendto(b"answer", THEM4, 999)
    reply = IP(stack.packets_to_send()[0])
    assert reply[UDP].dport == 999 and bytes(reply[UDP].payload) == b"answer"
    assert reply[UDP].chksum == UDP(bytes(reply[UDP])).chksum
    with pytest.raises(StackError):
        stack.bind(5353)
    with pytest.raises(StackError):
        sock.sendto(b"x" * 1500, THEM4, 1)


def test_udp_closed_port_gets_icmp_unreachable() -> None:
    stack = make_stack()
    stack.receive_packet(bytes(IP(src=THEM4, dst=US4) / UDP(sport=1, dport=7) / b"x"), 0.0)
    stack.receive_packet(bytes(IPv6(src=THEM6, dst=US6) / UDP(sport=1, dport=7) / b"x"), 0.0)
    out = stack.packets_to_send()
    assert (IP(out[0])[ICMP].type, IP(out[0])[ICMP].code) == (3, 3)
    assert isinstance(IPv6(out[1]).payload, ICMPv6DestUnreach)


def test_tcp_to_closed_port_gets_rst_and_rst_gets_nothing() -> None:
    stack = make_stack()
    syn = IP(src=THEM4, dst=US4) / TCP(sport=40000, dport=81, seq=1000, flags="S")
    stack.receive_packet(bytes(syn), 0.0)
    rst = IP(stack.packets_to_send()[0])[TCP]
    assert rst.flags == "RA" and rst.ack == 1001 and rst.seq == 0
    stack.receive_packet(bytes(IP(src=THEM4, dst=US4) / TCP(dport=81, flags="R")), 0.0)
    assert stack.packets_to_send() == []
    ack = IP(src=THEM4, dst=US4) / TCP(sport=40000, dport=81, seq=5, ack=777, flags="A")
    stack.receive_packet(bytes(ack), 0.0)
    rst2 = IP(stack.packets_to_send()[0])[TCP]
    assert rst2.flags == "R" and rst2.seq == 777


def test_passive_open_with_scapy_syn_and_kernel_like_options() -> None:
    stack = make_stack()
    listener = stack.listen(80)
    syn = IP(src=THEM4, dst=US4) / TCP(
        sport=40001,
        dport=80,
        seq=0xFFFFFFFF,  # wraps right after the SYN
        flags="S",
        window=64240,
        options=[
            ("MSS", 1460),
            ("SAckOK", b""),
            ("Timestamp", (100, 0)),
            ("NOP", None),
            ("WScale", 7),
        ],
    )
    stack.receive_packet(bytes(syn), 0.0)
    synack = IP(stack.packets_to_send(0.0)[0])[TCP]
    assert synack.flags == "SA" and synack.ack == 0
    opts = dict(synack.options)
    assert opts["MSS"] == 1460 and opts["WScale"] == 7 and opts["Timestamp"][1] == 100
    final = (
        IP(src=THEM4, dst=US4)
        / TCP(
            sport=40001,
            dport=80,
            seq=0,
            ack=synack.seq + 1,
            flags="PA",
            window=502,
            options=[("NOP", None), ("NOP", None), ("Timestamp", (101, opts["Timestamp"][0]))],
        )
        / Raw(b"GET /")
    )
    stack.receive_packet(bytes(final), 0.01)
    assert ev.IncomingConnection(80) in stack.events()
    conn = listener.accept()
    assert conn is not None and conn.state is TcpState.ESTABLISHED
    assert conn.read() == b"GET /"


def test_not_for_us_and_fragments_are_counted() -> None:
    stack = make_stack()
    stack.receive_packet(bytes(IP(src=THEM4, dst="10.9.9.9") / UDP()), 0.0)
    stack.receive_packet(bytes(IP(src=THEM4, dst=US4, flags="MF") / UDP() / Raw(b"x" * 10)), 0.0)
    stack.receive_packet(b"\x45garbage", 0.0)
    assert stack.counters["ip_not_for_us"] == 1
    assert stack.counters["ip_fragment_dropped"] == 1
    assert stack.counters["ip_malformed"] == 1
    assert stack.packets_to_send() == []


def test_stack_api_errors() -> None:
    with pytest.raises(StackError):
        Stack([], rng=random.Random(0))
    with pytest.raises(StackError):
        Stack([US4], mtu=500, rng=random.Random(0))
    stack = Stack([US4], rng=random.Random(0))
    with pytest.raises(StackError):
        stack.connect(THEM6, 80, 0.0)
    stack.listen(80)
    with pytest.raises(StackError):
        stack.listen(80)


def _established(stack: Stack) -> TcpSegment:
    """Drive a passive open by hand; return a template segment from the peer."""
    stack.listen(80)
    syn = IP(src=THEM4, dst=US4) / TCP(
        sport=40002, dport=80, seq=100, flags="S", options=[("MSS", 1400), ("SAckOK", b"")]
    )
    stack.receive_packet(bytes(syn), 0.0)
    synack = IP(stack.packets_to_send(0.0)[0])[TCP]
    ack = TcpSegment(40002, 80, 101, (synack.seq + 1) & 0xFFFFFFFF, ACK, 1000)
    src, dst = pack_address(THEM4), pack_address(US4)
    stack.receive_packet(build_ipv4(src, dst, 6, build_tcp(ack, src, dst)), 0.0)
    stack.packets_to_send(0.0)
    return ack


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=20))
def test_fuzz_live_stack_random_packets(packets: list[bytes]) -> None:
    stack = make_stack()
    _established(stack)
    now = 0.0
    for packet in packets:
        now += 0.01
        stack.receive_packet(packet, now)
        stack.handle_timer(now)
        stack.packets_to_send(now)
        stack.events()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFFFFFF),
            st.integers(0, 0xFFFFFFFF),
            st.integers(0, 0xFF),
            st.integers(0, 0xFFFF),
            st.binary(max_size=64),
            st.booleans(),
        ),
        max_size=25,
    )
)
def test_fuzz_live_stack_valid_checksums_random_fields(
    segments: list[tuple[int, int, int, int, bytes, bool]],
) -> None:
    """Well-formed segments with random SEQ/ACK/flags/window hit the state machine."""
    stack = make_stack()
    template = _established(stack)
    src, dst = pack_address(THEM4), pack_address(US4)
    now = 0.0
    for seq, ack, flags, window, payload, near in segments:
        if near:  # mostly near the real sequence space, to get past acceptability checks
            seq = (template.seq + seq % 5000) & 0xFFFFFFFF
            ack = (template.ack + ack % 5000 - 2500) & 0xFFFFFFFF
        seg = TcpSegment(40002, 80, seq, ack, flags, window, payload, timestamp=None)
        now += 0.05
        stack.receive_packet(build_ipv4(src, dst, 6, build_tcp(seg, src, dst)), now)
        stack.handle_timer(now)
        stack.packets_to_send(now)
        stack.events()
    for _ in range(200):  # timers run down without exceptions
        deadline = stack.next_deadline()
        if deadline is None:
            break
        stack.handle_timer(deadline)
        stack.packets_to_send(deadline)


def test_memory_stays_bounded_under_a_flood_of_garbage() -> None:
    stack = make_stack()
    _established(stack)
    rng = random.Random(3)
    src, dst = pack_address(THEM4), pack_address(US4)
    tracemalloc.start()
    try:
        for i in range(20_000):
            seg = TcpSegment(
                40002 if i % 2 else rng.randrange(65536),
                80,
                rng.getrandbits(32),
                rng.getrandbits(32),
                rng.choice([ACK, 0x02, 0x04, 0x11, 0x18]),
                rng.randrange(65536),
                rng.randbytes(rng.randrange(0, 200)),
            )
            stack.receive_packet(build_ipv4(src, dst, 6, build_tcp(seg, src, dst)), i * 0.001)
            stack.packets_to_send(i * 0.001)
            stack.events()
            if i == 2000:
                baseline = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert grown < 2_000_000
    assert stack.connection_count <= 1 + 20_000 // 2  # SYNs only to the one listener


def test_a_burst_of_new_data_carries_one_set_of_ack_fields() -> None:
    """Segments sent together share the ACK, window, timestamps and SACK of the first;
    PSH only on the one that empties the buffer; no separate pure ACK follows."""
    stack = make_stack()
    listener = stack.listen(80)
    us, them = pack_address(US4), pack_address(THEM4)

    def deliver(segment: TcpSegment, now: float) -> None:
        stack.receive_packet(build_ipv4(them, us, 6, build_tcp(segment, them, us)), now)

    deliver(
        TcpSegment(
            5000,
            80,
            100,
            0,
            0x02,
            65535,
            mss=1460,
            wscale=7,
            sack_permitted=True,
            timestamp=(10, 0),
        ),
        0.0,
    )
    syn_ack = TCP(bytes(IP(stack.packets_to_send(0.0)[0])[TCP]))
    iss = syn_ack.seq
    deliver(
        TcpSegment(
            5000, 80, 101, iss + 1, ACK, 4000, timestamp=(11, dict(syn_ack.options)["Timestamp"][0])
        ),
        0.01,
    )
    stack.packets_to_send(0.01)
    stack.events()
    conn = listener.accept()
    assert conn is not None
    deliver(
        TcpSegment(5000, 80, 101, iss + 1, ACK | 0x08, 4000, b"request", timestamp=(12, 0)), 0.02
    )
    conn.read()
    conn.send(bytes(range(256)) * 40)  # 10,240 bytes: 8 segments of 1,448 (IW10 allows it)
    segments = [TCP(bytes(IP(packet)[TCP])) for packet in stack.packets_to_send(0.03)]
    assert len(segments) == 8
    assert all(len(bytes(s.payload)) > 0 for s in segments)  # no pure ACK among them
    assert {s.ack for s in segments} == {101 + len(b"request")}
    assert len({s.window for s in segments}) == 1
    assert len({dict(s.options)["Timestamp"] for s in segments}) == 1
    assert [bool(s.flags.P) for s in segments] == [False] * 7 + [True]
    seqs = [s.seq for s in segments]
    assert seqs == [iss + 1 + 1448 * i for i in range(8)]
    assert b"".join(bytes(s.payload) for s in segments) == bytes(range(256)) * 40
