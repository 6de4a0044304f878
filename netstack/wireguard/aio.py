"""asyncio adapter: a :class:`~netstack.wireguard.engine.WireGuardEngine` on a real UDP
socket (:class:`WireGuardSocket`).

Theory of operation: the adapter owns a non-blocking UDP socket with large kernel
buffers and registers it with ``loop.add_reader``.  Each wake-up drains the socket
with ``recvfrom_into`` until ``BlockingIOError`` (bounded per wake-up so one busy
socket cannot starve the loop), which is several times faster than asyncio's
``DatagramProtocol`` (one datagram per loop iteration).  Because it sees the whole
batch, it knows how many handshake messages are still queued behind the current one
and passes that as the engine's load signal (wireguard-go's handshake queue length).
Like wireguard-go's separate queues, a batch's transport messages are processed and
flushed first and its handshake messages after them: under a handshake flood the
tunnel's packets in a batch do not wait for up to 2047 answers ahead of them.

After every input -- datagrams, an outbound IP packet, a timer -- :meth:`flush`
sends what the engine produced, hands decrypted packets to ``on_packet`` and events
to ``on_event``, and re-arms the single timer from ``engine.next_deadline()``.
Consecutive datagrams of equal size to one address (a bulk transfer's full-MTU
packets) leave in one ``sendmsg`` with a ``UDP_SEGMENT`` control message: the kernel
splits them (UDP GSO), which costs a third of one ``sendto`` per datagram; a kernel
that refuses it turns the batching off.  Sends that hit a full socket buffer wait in
a bounded queue drained by ``loop.add_writer``; beyond that, datagrams are dropped
like any UDP loss.

Routed endpoints: a datagram path other than this socket (WireGuard datagrams over a
TLS stream when UDP is blocked) plugs in with :meth:`WireGuardSocket.route`: what the
engine addresses to a routed endpoint goes to that route's :class:`DatagramSink`
instead, and :meth:`WireGuardSocket.receive_routed` feeds the engine what the route
received, as if it came from that endpoint.  The engine does not know: its peer's
endpoint is still just an address, and roaming works as on UDP.  A route's endpoint
is either a peer's UDP address (the agent moves a gateway's traffic onto the stream
and back without the engine noticing) or a :class:`StreamAddress` naming one stream
(the gateway: a peer that sent from it roams there, and back to UDP when it sends
from UDP again).  Datagrams for a stream address whose route is gone are dropped:
such an address is never given to the UDP socket.  :meth:`WireGuardSocket.watch`
asks to hear of datagrams that still arrive over UDP from an endpoint (the agent's
UDP probes while a gateway is on the stream), after the engine processed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, Protocol

from netstack.looptimer import EarliestTimer

from .config import Config
from .engine import WireGuardEngine
from .errors import ConfigError
from .events import Address, Event

SOCKET_BUFFER = 4 * 1024 * 1024
MAX_DATAGRAMS_PER_WAKEUP = 2048
MAX_PENDING_SENDS = 4096
_RECV_SIZE = 65536


async def resolve_endpoints(
    config: Config, family: int = socket.AF_INET
) -> dict[tuple[str, int], tuple[str, int]]:
    """Resolve the host names among ``config``'s endpoints (for ``apply_peers``)."""
    loop = asyncio.get_running_loop()
    resolved: dict[tuple[str, int], tuple[str, int]] = {}
    for peer in config.peers:
        if peer.endpoint is None:
            continue
        host, port = peer.endpoint
        try:
            ipaddress.ip_address(host)
            continue
        except ValueError:
            pass
        try:
            infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ConfigError(f"Endpoint {host!r}: cannot resolve ({exc})") from exc
        if not infos:
            raise ConfigError(f"Endpoint {host!r}: no address")
        address = infos[0][4]
        resolved[peer.endpoint] = (str(address[0]), int(address[1]))
    return resolved


UDP_SEGMENT = 103  # linux/udp.h: the GSO segment size, as a SOL_UDP control message
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS
GSO_MAX_BYTES = 65000  # the whole super-datagram must fit an IP datagram
_SEGMENT_SIZE = struct.Struct("=H")
_GSO_UNSUPPORTED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE}


def open_udp_socket(host: str, port: int) -> socket.socket:
    """A bound, non-blocking UDP socket with large buffers (forced when privileged)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for option, forced in (
            (socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None)),
            (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None)),
        ):
            try:
                if forced is None:
                    raise PermissionError
                sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class DatagramSink(Protocol):
    """Where a routed endpoint's datagrams go (one batch per flush, in order)."""

    def send_datagrams(self, datagrams: list[bytes]) -> None: ...


UdpWatcher = Callable[[list[bytes], float], None]


class StreamAddress(NamedTuple):
    """The endpoint of one stream (e.g. ``("wss", "203.0.113.9:50122")``): an address
    the engine can roam to that is never a UDP destination."""

    scheme: str
    peer: str


class WireGuardSocket:
    """A sans-IO :class:`WireGuardEngine` served on a UDP socket by an asyncio loop:
    datagrams read in batches, sent with UDP GSO, one timer for all its peers; other
    datagram paths plug in as routed endpoints (see the module docstring)."""

    def __init__(
        self,
        engine: WireGuardEngine,
        sock: socket.socket,
        *,
        on_packet: Callable[[bytes], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.engine = engine
        self.sock = sock
        self._loop = loop or asyncio.get_running_loop()
        self._on_packet = on_packet or self._queue_packet
        self._on_event = on_event
        self.packets: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4096)
        self._buffer = bytearray(_RECV_SIZE)
        self._view = memoryview(self._buffer)
        self._timer = EarliestTimer(self._loop, self._on_timer)
        self._pending: deque[tuple[bytes, Address]] = deque()
        #: batch equal-sized datagrams with UDP GSO (Linux >= 4.18); off after a refusal
        self.gso = sys.platform == "linux" and sock.type == socket.SOCK_DGRAM
        self.gso_sends = 0
        #: routed endpoints (module docstring) and datagrams dropped for want of a route
        self._routes: dict[Address, DatagramSink] = {}
        self._routing = False  # once anything was routed, every send is looked up
        self.unrouted = 0
        self._watched: dict[Address, UdpWatcher] = {}
        self._writing = False
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def open(
        cls,
        engine: WireGuardEngine,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        on_packet: Callable[[bytes], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> WireGuardSocket:
        """Bind a socket on ``host:port`` and start serving ``engine`` on it."""
        sock = open_udp_socket(host, port)
        return cls(engine, sock, on_packet=on_packet, on_event=on_event)

    @property
    def local_address(self) -> Address:
        return tuple(self.sock.getsockname())

    def now(self) -> float:
        return self._loop.time()

    # ---------------------------------------------------------------- inputs

    def _on_readable(self) -> None:
        batch: list[tuple[bytes, Address]] = []
        recv = self.sock.recvfrom_into
        view = self._view
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                size, addr = recv(self._buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # e.g. ICMP port unreachable reported on the socket
            batch.append((bytes(view[:size]), addr))
        if not batch:
            return
        now = self._loop.time()
        handshakes: list[tuple[bytes, Address]] = []
        self.engine.receive_datagrams(batch, now, deferred=handshakes)
        if handshakes:  # the tunnel's packets leave before the handshake work starts
            self.flush()
            self.engine.receive_datagrams(handshakes, now)
        self.flush()
        if self._watched:
            self._notify_watchers(batch, now)

    def _notify_watchers(self, batch: list[tuple[bytes, Address]], now: float) -> None:
        seen: dict[Address, list[bytes]] = {}
        for data, addr in batch:
            key = addr[:2]
            if key in self._watched:
                seen.setdefault(key, []).append(data)
        for key, datagrams in seen.items():
            watcher = self._watched.get(key)
            if watcher is not None:
                watcher(datagrams, now)

    def watch(self, endpoint: Address, watcher: UdpWatcher | None) -> None:
        """Call ``watcher(datagrams, now)`` with what arrives over UDP from ``endpoint``
        (host, port), after the engine processed it at ``now`` (None: stop)."""
        if watcher is None:
            self._watched.pop(tuple(endpoint[:2]), None)
        else:
            self._watched[tuple(endpoint[:2])] = watcher

    def send_packet(self, packet: bytes) -> bool:
        """Route one IP packet into the tunnel; False if no peer covers its destination."""
        routed = self.engine.send_packet(packet, self._loop.time())
        self.flush()
        return routed

    def send_packets(self, packets: list[bytes]) -> int:
        """Route a batch of IP packets with one flush; returns how many had no peer."""
        unroutable = self.engine.send_packets(packets, self._loop.time())
        self.flush()
        return unroutable

    def _on_timer(self) -> None:
        self.engine.handle_timer(self._loop.time())
        self.flush()

    def route(self, endpoint: Address, sink: DatagramSink | None) -> None:
        """Send what the engine addresses to ``endpoint`` through ``sink`` (None: the
        UDP socket again, or nowhere for a :class:`StreamAddress`)."""
        if sink is None:
            self._routes.pop(endpoint, None)
        else:
            self._routes[endpoint] = sink
            self._routing = True  # (a stream address may outlive its route)

    def routed(self, endpoint: Address) -> DatagramSink | None:
        return self._routes.get(endpoint)

    def receive_routed(self, datagrams: list[bytes], endpoint: Address) -> None:
        """Datagrams a route received, processed as if they came from ``endpoint``
        (transport messages first, as for a UDP batch)."""
        if self._closed or not datagrams:
            return
        now = self._loop.time()
        handshakes: list[tuple[bytes, Address]] = []
        self.engine.receive_datagrams([(d, endpoint) for d in datagrams], now, deferred=handshakes)
        if handshakes:
            self.flush()
            self.engine.receive_datagrams(handshakes, now)
        self.flush()

    # ---------------------------------------------------------------- outputs

    def flush(self) -> None:
        """Send datagrams, deliver packets and events, re-arm the timer."""
        if self._closed:
            return
        engine = self.engine
        out = engine.datagrams_to_send()
        if out:
            self._send_all(out)
        for packet in engine.packets_received():
            self._on_packet(packet)
        if self._on_event is not None:
            for event in engine.events():
                self._on_event(event)
        # the deadline moves on every data packet (send and receive reset different
        # WireGuard timers): an earlier-armed timer is kept (``netstack.looptimer``)
        self._timer.arm(engine.next_deadline())

    def _send_routed(self, out: list[tuple[bytes, Address]]) -> list[tuple[bytes, Address]]:
        """Hand routed endpoints their datagrams (a batch per route); the rest is UDP's."""
        routes = self._routes
        udp: list[tuple[bytes, Address]] = []
        batches: dict[int, tuple[DatagramSink, list[bytes]]] = {}
        for item in out:
            addr = item[1]
            sink = routes.get(addr)
            if sink is not None:
                batch = batches.get(id(sink))
                if batch is None:
                    batches[id(sink)] = (sink, [item[0]])
                else:
                    batch[1].append(item[0])
            elif type(addr) is StreamAddress:
                self.unrouted += 1  # its stream is gone: lost, as on a dead UDP path
            else:
                udp.append(item)
        for sink, datagrams in batches.values():
            sink.send_datagrams(datagrams)
        return udp

    def _send_all(self, out: list[tuple[bytes, Address]]) -> None:
        if self._routing:
            out = self._send_routed(out)
            if not out:
                return
        if self._pending:
            self._queue_sends(out)
            return
        sendto = self.sock.sendto
        i, count = 0, len(out)
        while i < count:
            data, addr = out[i]
            run = 1
            if self.gso and count - i > 1:
                # a run of equal-sized datagrams to one address (the last may be
                # shorter) leaves in one system call; the kernel splits it (UDP GSO)
                size, limit = (
                    len(data),
                    min(count - i, GSO_MAX_SEGMENTS, GSO_MAX_BYTES // len(data)),
                )
                while run < limit:
                    following, to = out[i + run]
                    if to != addr or len(following) > size:
                        break
                    run += 1
                    if len(following) < size:
                        break
            try:
                if run > 1:
                    self._send_segments(out, i, run, len(data), addr)
                else:
                    sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self._queue_sends(out[i:])
                return
            except OSError as exc:
                if run > 1 and exc.errno in _GSO_UNSUPPORTED:
                    self.gso = False  # this kernel/route cannot: one datagram at a time
                    continue
                # otherwise: unreachable destination, i.e. UDP loss
            i += run

    def _send_segments(
        self, out: list[tuple[bytes, Address]], start: int, run: int, size: int, addr: Address
    ) -> None:
        payload = b"".join(item[0] for item in out[start : start + run])
        control = [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
        self.sock.sendmsg([payload], control, 0, addr)
        self.gso_sends += 1

    def _queue_sends(self, out: list[tuple[bytes, Address]]) -> None:
        for item in out:
            if len(self._pending) >= MAX_PENDING_SENDS:
                break
            self._pending.append(item)
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        pending = self._pending
        while pending:
            data, addr = pending[0]
            try:
                self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass
            pending.popleft()
        self._loop.remove_writer(self.sock.fileno())
        self._writing = False

    def _queue_packet(self, packet: bytes) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.packets.put_nowait(packet)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        self._loop.remove_reader(self.sock.fileno())
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
        self.sock.close()
