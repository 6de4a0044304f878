"""The IP stack, sans-IO: raw packets and the time in, raw packets and events out.

Theory of operation
-------------------
``Stack.receive_packet(packet, now)`` parses the IP layer (``netstack.ip``), drops and
counts anything malformed, fragmented or not addressed to one of our addresses
(RFC 1122 section 3.3.4.2 "strong ES model"), and dispatches:

* TCP: to the connection keyed by the 4-tuple; a SYN without one goes to a listener
  (bounded by its backlog: the accept queue plus half-open connections); anything else
  is answered with a RST (RFC 9293 section 3.10.7.1), never a RST for a RST.
* UDP: to a bound socket (``UdpDatagramReceived`` event), else ICMP port unreachable
  (RFC 1122 section 4.1.3.1; RFC 4443 section 3.1).
* ICMP / ICMPv6 echo requests are answered (RFC 1122 section 3.2.2.6; RFC 4443 4.2).

Connections touched by input, timers or the application are marked dirty; the next
``packets_to_send()`` / ``events()`` / ``next_deadline()`` call services each dirty
connection once, so a burst of received packets yields one ACK, and all output goes
out in one batch.  Timers live in one heap with lazy invalidation; ``next_deadline()``
is the single deadline for the whole stack.  The stack never reads a clock: it keeps
the last ``now`` it was given.  Random ISNs, timestamp offsets and ephemeral ports come
from the injected ``rng`` (RFC 6528 asks for unpredictable ISNs: give it a
``random.SystemRandom`` in production).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import ipaddress
import random
from collections.abc import Iterable

from netstack import events as ev
from netstack import speedups
from netstack.icmp import (
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REQUEST,
    IcmpError,
    echo_reply,
    parse_icmp,
    port_unreachable,
)
from netstack.ip import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IpError,
    IpFragmentError,
    build_ip,
    format_address,
    pack_address,
    parse_ip,
)
from netstack.speedups import build_tcp_packet
from netstack.tcp import FAST_STATES, TcpConfig, TcpConnection, TcpState
from netstack.tcpwire import ACK, FIN, RST, SYN, TcpError, TcpSegment, parse_tcp
from netstack.udp import UdpError, build_udp, parse_udp

Address = str | ipaddress.IPv4Address | ipaddress.IPv6Address
_EPHEMERAL_LOW = 32768
_EPHEMERAL_HIGH = 60999
_CLOSED = TcpState.CLOSED

# Parses received packets and hands established connections' in-order segments to the
# hot path in the same step (Cython or its twin).  Looked up at each call: tests swap
# it out for the general path alone.
receive_tcp_run = speedups.tcp_receive_run


class StackError(Exception):
    """A misuse of the stack API (port in use, no address of that family, ...)."""


class TcpListener:
    """A listening TCP port; established connections wait in ``accept()``."""

    def __init__(self, port: int, backlog: int) -> None:
        self.port = port
        self.backlog = max(1, backlog)
        self.closed = False
        self._accept_queue: collections.deque[TcpConnection] = collections.deque()
        self._half_open: set[TcpConnection] = set()

    def accept(self) -> TcpConnection | None:
        """The oldest established connection not yet accepted, or None.

        The queue is filled when the stack services its connections (``events()``,
        ``packets_to_send()``), which reports ``IncomingConnection`` for each.
        """
        return self._accept_queue.popleft() if self._accept_queue else None

    @property
    def pending(self) -> int:
        """Connections waiting in the accept queue."""
        return len(self._accept_queue)

    def _has_room(self) -> bool:
        return len(self._accept_queue) + len(self._half_open) < self.backlog


class UdpSocket:
    """A bound UDP port; datagrams arrive as ``UdpDatagramReceived`` stack events."""

    def __init__(self, stack: Stack, port: int) -> None:
        self.port = port
        self._stack = stack
        self.closed = False

    def sendto(self, data: bytes, address: Address, port: int) -> None:
        """Queue one datagram to ``address``:``port``."""
        if self.closed:
            raise StackError("socket is closed")
        self._stack._send_udp(self.port, data, pack_address(address), port)

    def close(self) -> None:
        """Unbind the port."""
        if not self.closed:
            self.closed = True
            self._stack._udp.pop(self.port, None)


class Stack:
    """A user-space IPv4/IPv6 host with TCP, UDP and ICMP echo; see the module docstring."""

    def __init__(
        self,
        addresses: Iterable[Address],
        *,
        mtu: int = 1420,
        rng: random.Random,
        tcp_config: TcpConfig | None = None,
        max_connections: int = 65536,
    ) -> None:
        packed = [pack_address(a) for a in addresses]
        if not packed:
            raise StackError("a stack needs at least one address")
        if mtu < 1280:
            raise StackError("MTU below 1280 (the IPv6 minimum)")
        self.mtu = mtu
        self._local: frozenset[bytes] = frozenset()
        self._by_family: dict[int, list[bytes]] = {4: [], 16: []}
        self._set_local(packed)
        self._rng = rng
        self._ts_secret = rng.getrandbits(128).to_bytes(16, "big")
        base = tcp_config or TcpConfig()
        self._tcp_config = {
            4: dataclasses.replace(base, mss=mtu - 40),
            16: dataclasses.replace(base, mss=mtu - 60),
        }
        self.max_connections = max_connections
        self.counters: collections.Counter[str] = collections.Counter()
        self._conns: dict[tuple[bytes, int, bytes, int], TcpConnection] = {}
        self._keys: dict[TcpConnection, tuple[bytes, int, bytes, int]] = {}
        self._conn_listener: dict[TcpConnection, TcpListener] = {}
        self._listeners: dict[int, TcpListener] = {}
        self._udp: dict[int, UdpSocket] = {}
        self._out: list[bytes] = []
        self._events: list[ev.StackEvent] = []
        self._dirty: dict[TcpConnection, None] = {}
        self._timers: list[tuple[float, int, TcpConnection]] = []
        self._armed: dict[TcpConnection, float] = {}
        self._timer_seq = 0
        self._now = 0.0

    def _set_local(self, packed: list[bytes]) -> None:
        self._local = frozenset(packed)
        self._by_family = {size: [a for a in packed if len(a) == size] for size in (4, 16)}

    def _source_for(self, remote: bytes) -> bytes | None:
        """The local address to send from: the one sharing the longest prefix with
        ``remote`` (a gateway holds one address per agent subnet, and each agent only
        accepts the one inside its own subnet)."""
        candidates = self._by_family.get(len(remote), [])
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        target = int.from_bytes(remote, "big")
        bits = len(remote) * 8
        return max(
            candidates, key=lambda a: bits - (int.from_bytes(a, "big") ^ target).bit_length()
        )

    # ------------------------------------------------------------------ API

    def set_addresses(self, addresses: Iterable[Address]) -> None:
        """Replace the local addresses (connections keep the address they use)."""
        packed = [pack_address(a) for a in addresses]
        if not packed:
            raise StackError("a stack needs at least one address")
        self._set_local(packed)

    @property
    def connection_count(self) -> int:
        """TCP connections in the table (TIME_WAIT included)."""
        return len(self._conns)

    def listen(self, port: int, backlog: int = 128) -> TcpListener:
        """Accept TCP connections on ``port`` (all local addresses)."""
        if port in self._listeners:
            raise StackError(f"TCP port {port} is already listening")
        listener = TcpListener(port, backlog)
        self._listeners[port] = listener
        return listener

    def close_listener(self, listener: TcpListener) -> None:
        """Stop listening; connections already accepted are not affected."""
        listener.closed = True
        if self._listeners.get(listener.port) is listener:
            del self._listeners[listener.port]
        for conn in [*listener._accept_queue, *listener._half_open]:
            conn.abort()
        listener._accept_queue.clear()

    def connect(self, remote_address: Address, port: int, now: float) -> TcpConnection:
        """Open a TCP connection (active open); watch ``events()`` for the outcome."""
        self._now = now
        remote = pack_address(remote_address)
        local = self._source_for(remote)
        if local is None:
            raise StackError("no local address of that family")
        if len(self._conns) >= self.max_connections:
            raise StackError("too many connections")
        for _ in range(256):
            local_port = self._rng.randint(_EPHEMERAL_LOW, _EPHEMERAL_HIGH)
            key = (local, local_port, remote, port)
            if key not in self._conns:
                break
        else:
            raise StackError("no free ephemeral port")
        conn = TcpConnection.connect(
            local_port=local_port,
            remote_port=port,
            iss=self._rng.getrandbits(32),
            ts_offset=self._ts_offset(local, remote),
            now=now,
            config=self._tcp_config[len(remote)],
        )
        self._register(conn, key)
        return conn

    def bind(self, port: int) -> UdpSocket:
        """Bind a UDP port on all local addresses (0: a free ephemeral port)."""
        if port == 0:
            for _ in range(256):
                port = self._rng.randint(_EPHEMERAL_LOW, _EPHEMERAL_HIGH)
                if port not in self._udp:
                    break
            else:
                raise StackError("no free ephemeral UDP port")
        if port in self._udp:
            raise StackError(f"UDP port {port} is already bound")
        sock = UdpSocket(self, port)
        self._udp[port] = sock
        return sock

    def receive_packet(self, packet: bytes, now: float) -> None:
        """Process one IP packet that arrived from the link."""
        self.receive_packets([packet], now)

    def receive_packets(self, packets: list[bytes], now: float) -> None:
        """Process IP packets that arrived from the link together, in order.

        The established connections' in-order segments are taken by the hot path in
        one loop (``speedups.tcp_receive_run``); each packet it leaves goes through
        the general path below, already parsed.
        """
        self._now = now
        start, count = 0, len(packets)
        while start < count:
            index, parsed = receive_tcp_run(
                packets, start, now, self._local, self._conns, self._dirty, FAST_STATES, TcpSegment
            )
            if index >= count:
                return
            self._receive_general(packets[index], parsed, now)
            start = index + 1

    def _receive_general(
        self, packet: bytes, parsed: tuple[bytes, bytes, TcpSegment] | None, now: float
    ) -> None:
        """A packet the hot path did not take (``parsed``: its TCP parse, if any)."""
        if parsed is not None:
            src, dst, segment = parsed
            if dst in self._local:
                conn = self._conns.get((dst, segment.dst_port, src, segment.src_port))
                if conn is not None and conn.state in FAST_STATES:
                    # Established but declined by the hot path just now: no SYN
                    # handling to do here, straight to the connection's general path.
                    conn._receive_general(segment, now)
                    self._dirty[conn] = None
                    return
                self._receive_tcp(src, dst, segment, now)
                return
        try:
            ip = parse_ip(packet)
        except IpFragmentError:
            self.counters["ip_fragment_dropped"] += 1
            return
        except IpError:
            self.counters["ip_malformed"] += 1
            return
        if ip.dst not in self._local:
            self.counters["ip_not_for_us"] += 1
            return
        protocol = ip.protocol
        try:
            if protocol == PROTO_TCP:
                self._receive_tcp(ip.src, ip.dst, parse_tcp(ip.payload, ip.src, ip.dst), now)
            elif protocol == PROTO_UDP:
                self._receive_udp(ip.src, ip.dst, ip.payload, packet)
            elif (protocol == PROTO_ICMP and ip.version == 4) or (
                protocol == PROTO_ICMPV6 and ip.version == 6
            ):
                self._receive_icmp(ip.src, ip.dst, ip.payload)
            else:
                self.counters["ip_unknown_protocol"] += 1
        except TcpError:
            self.counters["tcp_malformed"] += 1
        except UdpError:
            self.counters["udp_malformed"] += 1
        except IcmpError:
            self.counters["icmp_malformed"] += 1

    def handle_timer(self, now: float) -> None:
        """Run every timer due at ``now``."""
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(timers)
            if self._armed.get(conn) != deadline:
                continue  # stale entry
            del self._armed[conn]
            conn.handle_timer(now)
            self._dirty[conn] = None

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must next be called (None: no timer armed)."""
        self._service()
        timers = self._timers
        while timers:
            deadline, _, conn = timers[0]
            if self._armed.get(conn) == deadline:
                return deadline
            heapq.heappop(timers)
        return None

    def packets_to_send(self, now: float | None = None) -> list[bytes]:
        """Every IP packet to put on the link, oldest first."""
        if now is not None:
            self._now = now
        self._service()
        out, self._out = self._out, []
        return out

    def events(self) -> list[ev.StackEvent]:
        """Stack events since the last call (call after ``packets_to_send``)."""
        self._service()
        out, self._events = self._events, []
        return out

    # ------------------------------------------------------------------ TCP

    def _register(self, conn: TcpConnection, key: tuple[bytes, int, bytes, int]) -> None:
        self._conns[key] = conn
        self._keys[conn] = key
        conn.notify = self._mark_dirty
        self._dirty[conn] = None

    def _mark_dirty(self, conn: TcpConnection) -> None:
        self._dirty[conn] = None

    def _receive_tcp(self, src: bytes, dst: bytes, seg: TcpSegment, now: float) -> None:
        key = (dst, seg.dst_port, src, seg.src_port)
        conn = self._conns.get(key)
        if (
            conn is not None
            and seg.flags & (SYN | ACK | RST) == SYN
            and seg.dst_port in self._listeners
            and conn.accepts_new_syn(seg)
        ):
            self._forget(conn, key)  # TIME-WAIT assassinated by a valid new SYN
            conn = None
        if conn is not None:
            conn.receive(seg, now)
            self._dirty[conn] = None
            return
        flags = seg.flags
        if flags & RST:
            return
        if flags & SYN and not flags & ACK:
            listener = self._listeners.get(seg.dst_port)
            if listener is not None:
                self._accept_syn(listener, src, dst, seg, now)
                return
        self.counters["tcp_reset_sent"] += 1
        self._send_reset(src, dst, seg)

    def _accept_syn(
        self, listener: TcpListener, src: bytes, dst: bytes, seg: TcpSegment, now: float
    ) -> None:
        if not listener._has_room() or len(self._conns) >= self.max_connections:
            self.counters["tcp_syn_dropped_backlog"] += 1
            return  # like Linux: drop, the peer retries its SYN
        conn = TcpConnection.accept(
            seg,
            iss=self._rng.getrandbits(32),
            ts_offset=self._ts_offset(dst, src),
            now=now,
            config=self._tcp_config[len(src)],
        )
        listener._half_open.add(conn)
        self._conn_listener[conn] = listener
        self._register(conn, (dst, seg.dst_port, src, seg.src_port))

    def _ts_offset(self, local: bytes, remote: bytes) -> int:
        """A secret but stable timestamp offset per address pair (RFC 7323 section 5.4,
        as Linux): timestamps stay monotonic across incarnations of a 4-tuple, which
        lets a new SYN replace a TIME-WAIT connection (RFC 6191)."""
        digest = hashlib.blake2b(local + remote, digest_size=4, key=self._ts_secret).digest()
        return int.from_bytes(digest, "big")

    def _send_reset(self, src: bytes, dst: bytes, seg: TcpSegment) -> None:
        """RFC 9293 section 3.10.7.1: the reset for a segment that has no connection."""
        if seg.flags & ACK:
            rst = TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
        else:
            ack = (seg.seq + len(seg.payload) + (seg.flags & SYN) // SYN + (seg.flags & FIN)) & (
                0xFFFFFFFF
            )
            rst = TcpSegment(seg.dst_port, seg.src_port, 0, ack, RST | ACK, 0)
        self._out.append(build_tcp_packet(rst, dst, src))

    def _service(self) -> None:
        """Collect output, events and deadlines of every dirty connection."""
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = {}
        now = self._now
        out = self._out
        keys = self._keys
        armed = self._armed
        conn_listener = self._conn_listener  # empty but for handshakes under way
        for conn in dirty:
            key = keys.get(conn)
            if key is None:
                continue
            local, _, remote, _ = key
            out.extend(conn.packets_to_send(now, local, remote))
            listener = conn_listener.get(conn) if conn_listener else None
            for event in conn.events():
                if listener is not None and isinstance(event, ev.Connected):
                    listener._half_open.discard(conn)
                    del self._conn_listener[conn]
                    if listener.closed:
                        conn.abort()
                        continue
                    listener._accept_queue.append(conn)
                    self._events.append(ev.IncomingConnection(listener.port))
                    listener = None
                    continue
                self._events.append(ev.TcpConnectionEvent(conn, event))
            if conn.state is _CLOSED:  # conn.is_closed
                out.extend(conn.packets_to_send(now, local, remote))  # a final RST (abort)
                self._forget(conn, key)
                continue
            deadline = conn.next_deadline()
            if deadline is None:
                armed.pop(conn, None)
            elif armed.get(conn) != deadline:
                armed[conn] = deadline
                self._timer_seq += 1
                heapq.heappush(self._timers, (deadline, self._timer_seq, conn))

    def _forget(self, conn: TcpConnection, key: tuple[bytes, int, bytes, int]) -> None:
        del self._conns[key]
        del self._keys[conn]
        self._armed.pop(conn, None)
        listener = self._conn_listener.pop(conn, None)
        if listener is not None:
            listener._half_open.discard(conn)
        conn.notify = None

    # ------------------------------------------------------------------ UDP, ICMP

    def _receive_udp(self, src: bytes, dst: bytes, payload: bytes, packet: bytes) -> None:
        datagram = parse_udp(payload, src, dst)
        sock = self._udp.get(datagram.dst_port)
        if sock is None:
            self.counters["udp_port_unreachable"] += 1
            proto = PROTO_ICMPV6 if len(src) == 16 else PROTO_ICMP
            self._out.append(build_ip(dst, src, proto, port_unreachable(packet, dst, src)))
            return
        self._events.append(
            ev.UdpDatagramReceived(
                sock.port,
                format_address(dst),
                format_address(src),
                datagram.src_port,
                datagram.payload,
            )
        )

    def _send_udp(self, local_port: int, data: bytes, remote: bytes, remote_port: int) -> None:
        local = self._source_for(remote)
        if local is None:
            raise StackError("no local address of that family")
        header = 48 if len(remote) == 16 else 28
        if len(data) + header > self.mtu:
            raise StackError("datagram larger than the MTU (this stack never fragments)")
        self._out.append(
            build_ip(
                local, remote, PROTO_UDP, build_udp(local_port, remote_port, data, local, remote)
            )
        )

    def _receive_icmp(self, src: bytes, dst: bytes, payload: bytes) -> None:
        message = parse_icmp(payload, src, dst)
        if message.type in (ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST) and message.code == 0:
            if (message.type == ICMPV6_ECHO_REQUEST) != (len(src) == 16):
                self.counters["icmp_ignored"] += 1
                return
            proto = PROTO_ICMPV6 if len(src) == 16 else PROTO_ICMP
            self._out.append(build_ip(dst, src, proto, echo_reply(message, dst, src)))
            self.counters["icmp_echo_replied"] += 1
        else:
            self.counters["icmp_ignored"] += 1
