"""asyncio adapter: a ``Stack`` over a packet link, with streams and datagram endpoints.

Theory of operation
-------------------
``AsyncStack`` owns a sans-IO ``Stack`` and a ``PacketLink`` (anything with
``send(packet)`` that calls back with received packets: a TUN fd, WireGuard, or the
in-memory ``MemoryLink`` used by tests).  Received packets are queued and processed in
one batch per loop iteration (so a burst yields one ACK); after every batch, timer or
application call, ``_kick`` runs the stack (``handle_timer``, ``packets_to_send``,
``events``), dispatches events to transports, and re-arms the one ``loop.call_at`` timer
from ``next_deadline()`` (STYLE.md rule 3).

The stack's clock is ``time.monotonic()``, read again for every slice of a large batch,
not ``loop.time()``: asyncio's loop time is the same clock, but uvloop's is libuv's
cached millisecond ``uv_now``, and a sub-millisecond RTT measured with it is 0 or 1 ms.
BBR's rate samples and pacing need better (with it, a download through the production
bench ran at 36-63 MB/s on BBR instead of CUBIC's 87: pacing refilled a half-millisecond
budget once per millisecond tick).  ``loop.time()`` never runs ahead of the monotonic
clock, so the loop's timer never wakes the stack before a deadline it computed.

Streams are the real ``asyncio.StreamReader`` / ``StreamWriter`` on top of
``_TcpTransport``, an ``asyncio.Transport``.  Back-pressure is real in both directions:
``write()`` moves bytes into the connection's bounded send buffer and keeps the rest in
the transport, pausing the protocol above ``high`` (so ``drain()`` waits for ACKs);
when the ``StreamReader`` is full it pauses reading, bytes stay in the connection and
the advertised TCP window closes (zero window) until the reader catches up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from netstack import events as ev
from netstack.ip import format_address
from netstack.looptimer import EarliestTimer
from netstack.stack import Address, Stack, TcpListener, UdpSocket
from netstack.tcp import TcpConnection

_READ_CHUNK = 256 * 1024
_MAX_ROUNDS = 64
_RECEIVE_SLICE = 32  # packets the stack takes in before its ACKs may go out


class PacketLink(Protocol):
    """Where IP packets go to and come from (a TUN fd, WireGuard, a test channel)."""

    def send(self, packet: bytes) -> None:
        """Put one IP packet on the link (may drop: IP is best effort)."""

    def attach(self, receive: Callable[[bytes], None]) -> None:
        """Register the callback to call with every packet that arrives."""


# A link may also offer ``send_many(packets: list[bytes])``: the adapter then hands it
# each pass's packets at once (WireGuard encrypts them and flushes its socket once).


class MemoryLink:
    """One end of an in-memory point-to-point link (see ``MemoryLink.pair``)."""

    def __init__(self) -> None:
        self.peer: MemoryLink | None = None
        self._receive: Callable[[bytes], None] | None = None
        self.filter: Callable[[bytes], bool] | None = None

    @classmethod
    def pair(cls) -> tuple[MemoryLink, MemoryLink]:
        """Two connected ends."""
        a, b = cls(), cls()
        a.peer, b.peer = b, a
        return a, b

    def attach(self, receive: Callable[[bytes], None]) -> None:
        """Register the receive callback."""
        self._receive = receive

    def send(self, packet: bytes) -> None:
        """Deliver to the other end on the next loop iteration."""
        peer = self.peer
        if peer is None or peer._receive is None:
            return
        if self.filter is not None and not self.filter(packet):
            return
        asyncio.get_running_loop().call_soon(peer._receive, packet)


class AsyncStack:
    """Runs a ``Stack`` on the asyncio loop over a ``PacketLink``."""

    def __init__(self, stack: Stack, link: PacketLink) -> None:
        self.stack = stack
        self.link = link
        self._loop = asyncio.get_running_loop()
        self._inbox: list[bytes] = []
        self._kick_scheduled = False
        self._timer = EarliestTimer(self._loop, self._kick)
        self._transports: dict[TcpConnection, _TcpTransport] = {}
        self._connecting: dict[TcpConnection, asyncio.Future[None]] = {}
        self._servers: dict[int, NetstackServer] = {}
        self._udp: dict[int, _UdpTransport] = {}
        self.closed = False
        link.attach(self.feed)

    # ------------------------------------------------------------------ driving

    def feed(self, packet: bytes) -> None:
        """Hand one received packet to the stack (processed in a batch soon)."""
        self._inbox.append(packet)
        self._schedule_kick()

    def _schedule_kick(self) -> None:
        if not self._kick_scheduled and not self.closed:
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self.closed:
            return
        stack = self.stack
        clock = time.monotonic
        now = clock()
        inbox, self._inbox = self._inbox, []
        # A wake-up may bring thousands of segments; answering only after all of them
        # would stretch ACKs (one per ~100 segments) and starve the peer's congestion
        # window.  Let the stack's output out every _RECEIVE_SLICE packets.
        for start in range(0, len(inbox), _RECEIVE_SLICE):
            stack.receive_packets(inbox[start : start + _RECEIVE_SLICE], now)
            if start + _RECEIVE_SLICE < len(inbox):  # more to come: send what is due
                self._transmit(stack.packets_to_send(now))
                now = clock()
        stack.handle_timer(now)
        for _ in range(_MAX_ROUNDS):
            packets = stack.packets_to_send(now)
            self._transmit(packets)
            stack_events = stack.events()
            for event in stack_events:
                self._dispatch(event)
            if not packets and not stack_events:
                break
        self._arm_timer()

    def _transmit(self, packets: list[bytes]) -> None:
        if not packets:
            return
        send_many = getattr(self.link, "send_many", None)  # optional batch interface
        if send_many is not None:
            send_many(packets)
        else:
            for packet in packets:
                self.link.send(packet)

    def _arm_timer(self) -> None:
        """Make sure the loop wakes the stack by its next deadline (one timer per
        deadline period, not one per segment sent: ``netstack.looptimer``)."""
        self._timer.arm(self.stack.next_deadline())

    def _dispatch(self, event: ev.StackEvent) -> None:
        if isinstance(event, ev.TcpConnectionEvent):
            conn = event.connection
            transport = self._transports.get(conn)
            if transport is not None:
                transport._on_event(event.event)
                return
            waiter = self._connecting.get(conn)
            if waiter is not None and not waiter.done():
                tcp_event = event.event
                if isinstance(tcp_event, ev.Connected):
                    waiter.set_result(None)
                elif isinstance(tcp_event, ev.ConnectionReset):
                    waiter.set_exception(ConnectionRefusedError("connection refused"))
                elif isinstance(tcp_event, ev.ConnectionTimedOut):
                    waiter.set_exception(TimeoutError("connection timed out"))
                elif isinstance(tcp_event, ev.ConnectionClosed):
                    waiter.set_exception(ConnectionAbortedError("connection closed"))
        elif isinstance(event, ev.IncomingConnection):
            server = self._servers.get(event.port)
            if server is not None:
                server._accept_all()
        elif isinstance(event, ev.UdpDatagramReceived):
            udp = self._udp.get(event.port)
            if udp is not None:
                udp._protocol.datagram_received(
                    event.data, (event.remote_address, event.remote_port)
                )

    def close(self) -> None:
        """Abort every connection, stop the timer and detach from the link."""
        for transport in list(self._transports.values()):
            transport.abort()
        for server in list(self._servers.values()):
            server.close()
        self._kick()
        self.closed = True
        self._timer.cancel()
        detach = getattr(self.link, "detach", None)
        if callable(detach):
            detach()

    # ------------------------------------------------------------------ streams

    async def open_connection(
        self,
        host: Address,
        port: int,
        *,
        timeout: float | None = 30.0,  # noqa: ASYNC109 -- the agreed API; aborts the SYN
        limit: int = 2**16,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect with TCP; like ``asyncio.open_connection``."""
        conn = self.stack.connect(host, port, time.monotonic())
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._connecting[conn] = waiter
        self._schedule_kick()
        try:
            await asyncio.wait_for(waiter, timeout)
        except BaseException:
            conn.abort()
            self._schedule_kick()
            raise
        finally:
            del self._connecting[conn]
        reader = asyncio.StreamReader(limit=limit, loop=self._loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self._loop)
        transport = _TcpTransport(self, conn, protocol)
        writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
        transport._deliver()
        return reader, writer

    async def start_server(
        self,
        client_connected_cb: Callable[
            [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
        ],
        port: int,
        *,
        backlog: int = 128,
        limit: int = 2**16,
    ) -> NetstackServer:
        """Listen on ``port``; like ``asyncio.start_server``."""
        loop = self._loop

        def streams() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

        return await self.create_server(streams, port, backlog=backlog)

    async def create_server(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        port: int,
        *,
        backlog: int = 128,
    ) -> NetstackServer:
        """Listen on ``port`` with a protocol per connection; like
        ``loop.create_server`` (no streams, no task per connection)."""
        listener = self.stack.listen(port, backlog)
        server = NetstackServer(self, listener, protocol_factory)
        self._servers[port] = server
        return server

    # ------------------------------------------------------------------ datagrams

    async def create_datagram_endpoint(
        self, protocol_factory: Callable[[], asyncio.DatagramProtocol], local_port: int
    ) -> tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]:
        """Bind a UDP port; like ``loop.create_datagram_endpoint``."""
        sock = self.stack.bind(local_port)
        protocol = protocol_factory()
        transport = _UdpTransport(self, sock, protocol)
        self._udp[sock.port] = transport  # local_port 0 picked an ephemeral one
        protocol.connection_made(transport)
        return transport, protocol


class NetstackServer:
    """A listening port served with ``client_connected_cb`` (like ``asyncio.Server``)."""

    def __init__(
        self,
        astack: AsyncStack,
        listener: TcpListener,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self._astack = astack
        self._listener = listener
        self._protocol_factory = protocol_factory
        self._closed = False
        self.port = listener.port

    def _accept_all(self) -> None:
        astack = self._astack
        while (conn := self._listener.accept()) is not None:
            transport = _TcpTransport(astack, conn, self._protocol_factory())
            transport._deliver()

    def close(self) -> None:
        """Stop listening (established connections stay open)."""
        if not self._closed:
            self._closed = True
            self._astack.stack.close_listener(self._listener)
            self._astack._servers.pop(self.port, None)
            self._astack._schedule_kick()

    def is_serving(self) -> bool:
        """True until ``close()``."""
        return not self._closed

    async def wait_closed(self) -> None:
        """Return once closed (nothing lingers here)."""
        await asyncio.sleep(0)

    async def __aenter__(self) -> NetstackServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


class _TcpTransport(asyncio.Transport):
    """An ``asyncio.Transport`` over one ``TcpConnection``."""

    def __init__(
        self, astack: AsyncStack, conn: TcpConnection, protocol: asyncio.BaseProtocol
    ) -> None:
        super().__init__()
        self._astack = astack
        self._conn = conn
        self._protocol: Any = protocol
        self._wbuf = bytearray()
        self._eof_pending = False
        self._closing = False
        self._lost = False
        self._eof_delivered = False
        self._peer_done = False
        self._reading_paused = False
        self._writing_paused = False
        self._high = 64 * 1024
        self._low = 16 * 1024
        stack = astack.stack
        key = stack._keys[conn]
        self._extra = {
            "sockname": (format_address(key[0]), key[1]),
            "peername": (format_address(key[2]), key[3]),
        }
        astack._transports[conn] = self
        protocol.connection_made(self)

    # -- asyncio.Transport API

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_pending or self._closing:
            raise RuntimeError("write after write_eof() or close()")
        if self._lost or not data:
            return
        self._wbuf += data
        self._push()
        if not self._writing_paused and len(self._wbuf) > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_pending:
            return
        self._eof_pending = True
        self._push()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._eof_pending = True
        self._conn.shutdown_read()
        # Like asyncio: buffered bytes still go out; the protocol hears of the end
        # (connection_lost) once they are all in the connection and FIN is queued.
        self._push()

    def abort(self) -> None:
        self._closing = True
        self._wbuf.clear()
        self._conn.abort()
        self._astack._schedule_kick()
        self._astack._loop.call_soon(self._connection_lost, None)

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._astack._loop.call_soon(self._deliver)

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def get_write_buffer_size(self) -> int:
        return len(self._wbuf)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    # -- plumbing

    def _push(self) -> None:
        conn = self._conn
        if self._wbuf and not conn.is_closed:
            # Offer everything: a short accept arms the connection's SendSpaceAvailable.
            with memoryview(self._wbuf) as view:
                accepted = conn.send(view)
            del self._wbuf[:accepted]
        if self._eof_pending and not self._wbuf:
            if not conn.is_closed:
                conn.close()
            if self._closing and not self._lost:
                self._astack._loop.call_soon(self._connection_lost, None)
        if self._writing_paused and len(self._wbuf) <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()
        self._astack._schedule_kick()

    def _deliver(self) -> None:
        conn = self._conn
        while not self._reading_paused and not self._lost and conn.readable_bytes:
            self._protocol.data_received(conn.read(_READ_CHUNK))
        if conn.at_eof and not self._eof_delivered and not self._reading_paused:
            self._eof_delivered = True
            keep_open = self._protocol.eof_received()
            if not keep_open:
                self.close()
        if self._peer_done and not conn.readable_bytes and (self._eof_delivered or not conn.at_eof):
            self._connection_lost(None)
        self._astack._schedule_kick()

    def _on_event(self, event: ev.TcpEvent) -> None:
        if isinstance(event, ev.DataAvailable | ev.EndOfStream):
            self._deliver()
        elif isinstance(event, ev.SendSpaceAvailable):
            self._push()
        elif isinstance(event, ev.ConnectionReset):
            self._connection_lost(ConnectionResetError("connection reset by peer"))
        elif isinstance(event, ev.ConnectionTimedOut):
            self._connection_lost(TimeoutError("connection timed out"))
        elif isinstance(event, ev.ConnectionClosed):
            # Bytes may still wait in the connection (the reader is paused): the
            # protocol learns of the end only after it has taken all of them.
            self._peer_done = True
            self._deliver()

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._astack._transports.pop(self._conn, None)
        self._protocol.connection_lost(exc)


class _UdpTransport(asyncio.DatagramTransport):
    """An ``asyncio.DatagramTransport`` over a bound ``UdpSocket``."""

    def __init__(
        self, astack: AsyncStack, sock: UdpSocket, protocol: asyncio.DatagramProtocol
    ) -> None:
        super().__init__()
        self._astack = astack
        self._sock = sock
        self._protocol = protocol
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return ("", self._sock.port)
        return default

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if self._closing:
            raise RuntimeError("transport is closing")
        if addr is None:
            raise ValueError("an address is required")
        self._sock.sendto(bytes(data), addr[0], addr[1])
        self._astack._schedule_kick()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._sock.close()
        self._astack._udp.pop(self._sock.port, None)
        self._astack._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()
