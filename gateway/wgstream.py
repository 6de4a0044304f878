"""The gateway's end of the stream transport: WireGuard datagrams from agents over a
WebSocket on the public HTTP(S) listener, when their UDP is blocked.

Theory of operation
-------------------
The HTTP listener (``gateway/proxy/http.py``) hands every request for the reserved
path (``common.wgstream.PATH``, on any host, before routing) to
:meth:`StreamAcceptor.accept` together with the connection.  The acceptor answers the
WebSocket upgrade itself (websockets' sans-IO server: ``GET``, ``Upgrade: websocket``,
version 13, the subprotocol ``kakuremichi.wireguard.v1``; anything else gets its 4xx
and the connection closes) and the connection becomes a
:class:`~common.wgstream.DatagramStream` whose datagrams go to the gateway's own
WireGuard, which does all the authenticating:

* the ``userspace`` backend (our engine on a UDP socket): each stream is a routed
  endpoint of the engine's socket (``WireGuardSocket.route``) named by a
  :class:`~netstack.wireguard.aio.StreamAddress` (``wss:<client ip>:<port>``).  Its
  datagrams are fed to the engine as if they came from that address; an agent whose
  authenticated datagrams arrive there roams there, so the engine's answers to it go
  back down the stream, and roams back to UDP when the agent does;
* the ``kernel`` / ``wireguard-go`` backends: each stream gets a UDP socket of its own
  on the loopback, connected to the interface's port, and relays datagrams both ways
  through it.  WireGuard sees an ordinary endpoint (``127.0.0.1:<port>``) and roams to
  it and away from it as on any network.

Nothing on the stream is trusted: a stream is *authenticated* once our WireGuard
answers it with a handshake response or a transport message, which it only does for
a peer that proved its key.  Until then it may send at most ``max_pre_auth``
datagrams and must be authenticated within ``auth_timeout`` seconds, else it is closed
(the agent sends an initiation as its first datagram on a new stream).  Garbage,
non-WireGuard records, text messages, oversized messages (over
``common.wgstream.MAX_MESSAGE``) and broken framing close a stream at once
(``common.wgstream``); a stream that goes silent is closed after its idle timeout.  At
most ``max_sessions`` streams exist and one address (IPv6: a /64) may hold
``max_pending_per_address`` unauthenticated ones; beyond either the upgrade gets
503/429.  A slow or silent client before the upgrade is the HTTP listener's (header
and TLS handshake timeouts).  Refusals and closes are logged once per address per
minute; metrics count them by reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol

from common.logs import OncePer, kv
from common.relay.limits import client_key
from common.relay.metrics import Metrics
from common.wgstream import PATH, SUBPROTOCOL, DatagramStream, StreamSettings
from common.wgstream.connection import WEBSOCKET_LOG
from common.wgstream.records import MAX_MESSAGE
from netstack.wireguard.aio import StreamAddress, WireGuardSocket
from netstack.wireguard.messages import MESSAGE_RESPONSE, MESSAGE_TRANSPORT

if TYPE_CHECKING:
    from gateway.proxy.h1 import RequestHead

log = logging.getLogger("gateway.wgstream")

_PATH = PATH.encode()
_RECV_BATCH = 256
_RECV_SIZE = 65536


@dataclass(frozen=True)
class StreamServerSettings:
    """Bounds of the gateway's streams (see the module docstring)."""

    auth_timeout: float = 10.0
    max_pre_auth: int = 1024
    max_sessions: int = 4096
    max_pending_per_address: int = 8
    stream: StreamSettings = field(default_factory=StreamSettings)


class Binding(Protocol):
    """How one stream's datagrams reach the gateway's WireGuard (``deliver``) and its
    answers come back (to ``_Session.outgoing``); ``endpoint`` is the address the
    WireGuard interface sees the agent at, as ``wg show`` would print it."""

    endpoint: str
    dropped: int

    def deliver(self, datagrams: list[bytes]) -> None: ...

    def close(self) -> None: ...


class EngineBinding:
    """The userspace backend: the stream is a routed endpoint of our engine's socket."""

    def __init__(self, sock: WireGuardSocket, address: StreamAddress, session: _Session) -> None:
        self.sock = sock
        self.address = address
        self.endpoint = f"{address.scheme}:{address.peer}"
        self.dropped = 0  # (the engine's socket counts what it cannot route)
        self._session = session
        sock.route(address, self)

    def send_datagrams(self, datagrams: list[bytes]) -> None:  # the engine's output
        self._session.outgoing(datagrams)

    def deliver(self, datagrams: list[bytes]) -> None:
        self.sock.receive_routed(datagrams, self.address)

    def close(self) -> None:
        if self.sock.routed(self.address) is self:
            self.sock.route(self.address, None)


class RelayBinding:
    """The kernel / wireguard-go backends: a loopback UDP socket per stream, connected
    to the interface's port, so WireGuard sees an ordinary endpoint."""

    def __init__(self, port: int, session: _Session, loop: asyncio.AbstractEventLoop) -> None:
        self._session = session
        self._loop = loop
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.bind(("127.0.0.1", 0))
            self.sock.connect(("127.0.0.1", port))
            loop.add_reader(self.sock.fileno(), self._readable)
        except BaseException:
            self.sock.close()
            raise
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.dropped = 0
        self._closed = False

    def deliver(self, datagrams: list[bytes]) -> None:
        send = self.sock.send
        for datagram in datagrams:
            try:
                send(datagram)
            except (BlockingIOError, InterruptedError):
                self.dropped += 1  # the interface falls behind: a UDP queue would drop too
            except OSError:
                self.dropped += 1  # e.g. ECONNREFUSED after the interface went away

    def _readable(self) -> None:
        batch: list[bytes] = []
        recv = self.sock.recv
        for _ in range(_RECV_BATCH):
            try:
                batch.append(recv(_RECV_SIZE))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error reported on the socket
        if batch:
            self._session.outgoing(batch)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


BindingFactory = Callable[["_Session"], Binding]


class _Session:
    """One agent's stream: the WebSocket, its binding, whether WireGuard vouched for it."""

    def __init__(self, acceptor: StreamAcceptor, peer_ip: str, peer_port: int, proto: str) -> None:
        self.acceptor = acceptor
        self.peer_ip = peer_ip
        self.peer_port = peer_port
        self.key = client_key(peer_ip)
        self.scheme = "wss" if proto == "https" else "ws"
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.authenticated = False
        self.pre_auth = 0
        self.pending = True  # counted in the acceptor's per-address pending streams
        self.stream: DatagramStream | None = None
        self.binding: Binding | None = None
        self.reported = (0, 0, 0)  # bytes in, bytes out, dropped: already in the counters
        self._auth_timer: asyncio.TimerHandle | None = None

    @property
    def label(self) -> str:
        return f"{self.peer_ip}:{self.peer_port}"

    def start(self, stream: DatagramStream, binding: Binding) -> None:
        self.stream, self.binding = stream, binding
        self._auth_timer = self.loop.call_later(self.acceptor.settings.auth_timeout, self._expired)

    def incoming(self, datagrams: list[bytes]) -> None:
        """Datagrams from the agent: to our WireGuard (bounded until authenticated)."""
        if not self.authenticated:
            self.pre_auth += len(datagrams)
            if self.pre_auth > self.acceptor.settings.max_pre_auth:
                self.acceptor.end(self, "unauthenticated", "too many datagrams before a handshake")
                return
        if self.binding is not None:
            self.binding.deliver(datagrams)

    def outgoing(self, datagrams: list[bytes]) -> None:
        """Datagrams from our WireGuard to the agent."""
        if not self.authenticated:
            for datagram in datagrams:
                if datagram[0] in (MESSAGE_RESPONSE, MESSAGE_TRANSPORT):
                    self.acceptor.authenticated(self)
                    break
        if self.stream is not None:
            self.stream.send_datagrams(datagrams)

    def _expired(self) -> None:
        self._auth_timer = None
        if not self.authenticated:
            limit = self.acceptor.settings.auth_timeout
            self.acceptor.end(self, "unauthenticated", f"no WireGuard handshake within {limit:g}s")

    def stop(self) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        if self.binding is not None:
            self.binding.close()


class StreamAcceptor:
    """Takes over the HTTP connections that ask for the stream path (module docstring)."""

    def __init__(
        self,
        binding: BindingFactory | None = None,
        metrics: Metrics | None = None,
        settings: StreamServerSettings | None = None,
    ) -> None:
        self.settings = settings or StreamServerSettings()
        self.metrics = metrics if metrics is not None else Metrics()
        self._binding = binding
        self.sessions: set[_Session] = set()
        self._pending: dict[str, int] = {}  # client key → unauthenticated streams
        self._endpoints: dict[str, _Session] = {}  # binding endpoint → its session
        self._logged = OncePer(60.0, max_keys=256)
        self.closing = False
        r = self.metrics.registry
        self._gauge = r.gauge(
            "kakuremichi_wireguard_streams",
            "Open WireGuard stream connections (UDP-blocked agents), by state "
            "(pending: no WireGuard handshake yet; authenticated).",
            ("state",),
        )
        self._refused = r.counter(
            "kakuremichi_wireguard_stream_refused_total",
            "WireGuard stream upgrades refused, by reason.",
            ("reason",),
        )
        self._closed = r.counter(
            "kakuremichi_wireguard_stream_closed_total",
            "WireGuard stream connections ended, by reason.",
            ("reason",),
        )
        self._bytes = r.counter(
            "kakuremichi_wireguard_stream_bytes_total",
            "Bytes of WireGuard stream messages, by direction (rx: from agents).",
            ("direction",),
        )
        self._dropped = r.counter(
            "kakuremichi_wireguard_stream_dropped_total",
            "WireGuard transport messages to agents dropped at a full stream buffer.",
        )
        self._transport = r.gauge(
            "kakuremichi_wireguard_transport",
            "The transport each agent's WireGuard session uses now (1 for udp or tcp).",
            ("agent", "transport"),
        )
        self._delay = r.gauge(
            "kakuremichi_wireguard_stream_queueing_delay_seconds",
            "Round trip of the last ping on an agent's stream above the smallest seen.",
            ("agent",),
        )
        r.add_collector(self._collect)
        self._gauge.set(0, state="pending")
        self._gauge.set(0, state="authenticated")

    # -- the listener's hook ----------------------------------------------------------

    @staticmethod
    def claims(target: bytes) -> bool:
        """Whether a request target is the stream path (any query ignored)."""
        return target.split(b"?", 1)[0] == _PATH

    def accept(
        self, transport: asyncio.Transport, request: RequestHead, rest: bytes, proto: str
    ) -> None:
        """Answer the upgrade on ``transport`` (which the HTTP session gave up) and, if
        it is one, serve the stream on it."""
        peer = transport.get_extra_info("peername")
        peer_ip, peer_port = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        server = ServerProtocol(
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            max_size=MAX_MESSAGE,
            logger=WEBSOCKET_LOG,
        )
        refusal = self._admission(peer_ip, request)
        if refusal is not None:
            status, reason, text = refusal
            self._refused.inc(reason=reason)
            self._log_refusal(peer_ip, reason, text)
            self._answer(transport, server, server.reject(status, text + "\n"))
            return
        # the head the listener parsed goes to websockets' server as bytes again: its
        # parser must see the request before it reads frames
        headers = Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers])
        method = request.method.decode("latin-1")
        target = request.target.decode("latin-1")
        with contextlib.suppress(UnicodeError, ValueError):  # not ASCII: refused below
            server.receive_data(Request(target, headers, method=method).serialize())
        parsed = [e for e in server.events_received() if isinstance(e, Request)]
        if parsed:
            response = server.accept(parsed[0])
        else:
            response = server.reject(400, "Failed to open a WebSocket connection.\n")
        if response.status_code != 101:
            self._refused.inc(reason="bad_upgrade")
            self._log_refusal(peer_ip, "bad_upgrade", f"HTTP {response.status_code}")
            self._answer(transport, server, response)
            return
        server.send_response(response)  # written by the stream as it starts
        session = _Session(self, peer_ip, peer_port, proto)
        stream = DatagramStream(
            server,
            on_datagrams=session.incoming,
            on_closed=lambda reason: self._gone(session, reason),
            settings=self.settings.stream,
        )
        try:
            binding = self._bind(session)
        except OSError as exc:
            log.error("cannot relay a WireGuard stream", extra=kv(error=str(exc)))
            self._refused.inc(reason="relay_failed")
            transport.abort()
            return
        self.sessions.add(session)
        self._pending[session.key] = self._pending.get(session.key, 0) + 1
        self._endpoints[binding.endpoint] = session
        session.start(stream, binding)
        self._count()
        transport.set_protocol(stream)
        stream.connection_made(transport)
        with contextlib.suppress(Exception):
            transport.resume_reading()
        if rest:
            stream.data_received(rest)
        log.debug("WireGuard stream opened", extra=kv(client=session.label))

    def _admission(self, peer_ip: str, request: RequestHead) -> tuple[int, str, str] | None:
        if self.closing:
            return 503, "shutting_down", "The gateway is shutting down."
        if self._binding is None:
            return 503, "unavailable", "This gateway does not offer the stream transport."
        if len(self.sessions) >= self.settings.max_sessions:
            return 503, "too_many", "Too many WireGuard streams."
        if self._pending.get(client_key(peer_ip), 0) >= self.settings.max_pending_per_address:
            return 429, "pending_per_address", "Too many unauthenticated streams from here."
        if request.chunked or request.content_length:
            return 400, "bad_upgrade", "An upgrade request has no body."
        return None

    def _bind(self, session: _Session) -> Binding:
        assert self._binding is not None
        return self._binding(session)

    @staticmethod
    def _answer(transport: asyncio.Transport, server: ServerProtocol, response: object) -> None:
        server.send_response(response)  # type: ignore[arg-type]
        for data in server.data_to_send():
            if data and not transport.is_closing():
                transport.write(data)
        transport.close()

    # -- sessions ---------------------------------------------------------------------

    def authenticated(self, session: _Session) -> None:
        if session.authenticated:
            return
        session.authenticated = True
        self._unpend(session)
        self._count()
        log.info(
            "WireGuard stream authenticated",
            extra=kv(client=session.label, endpoint=session.binding and session.binding.endpoint),
        )

    def end(self, session: _Session, reason: str, detail: str) -> None:
        """Close a stream for ``reason`` (a metrics label)."""
        if session.stream is not None:
            session.stream.close_reason = session.stream.close_reason or detail
            session.stream.close(detail, 1008)
        self._gone(session, detail, reason)

    def _gone(self, session: _Session, detail: str, reason: str | None = None) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self._unpend(session)
        session.stop()
        if session.binding is not None:
            self._endpoints.pop(session.binding.endpoint, None)
        self._report(session)
        if reason is None:
            reason = _reason_of(detail, self.closing)
        self._closed.inc(reason=reason)
        self._count()
        lived = round(self.loop_time() - session.started, 1)
        if session.authenticated:
            log.info(
                "WireGuard stream closed",
                extra=kv(client=session.label, reason=detail, seconds=lived),
            )
        else:
            self._log_refusal(session.peer_ip, reason, detail)

    def _unpend(self, session: _Session) -> None:
        if not session.pending:
            return
        session.pending = False
        count = self._pending.get(session.key, 0)
        if count <= 1:
            self._pending.pop(session.key, None)
        else:
            self._pending[session.key] = count - 1

    def _count(self) -> None:
        authenticated = sum(1 for s in self.sessions if s.authenticated)
        self._gauge.set(authenticated, state="authenticated")
        self._gauge.set(len(self.sessions) - authenticated, state="pending")

    def _report(self, session: _Session) -> None:
        stream = session.stream
        if stream is None:
            return
        dropped = stream.dropped + (session.binding.dropped if session.binding else 0)
        now = (stream.bytes_in, stream.bytes_out, dropped)
        rx, tx, lost = (a - b for a, b in zip(now, session.reported, strict=True))
        session.reported = now
        if rx:
            self._bytes.inc(rx, direction="rx")
        if tx:
            self._bytes.inc(tx, direction="tx")
        if lost:
            self._dropped.inc(lost)

    def _collect(self) -> None:
        for session in self.sessions:
            self._report(session)

    def _log_refusal(self, peer_ip: str, reason: str, detail: str) -> None:
        due, unlogged = self._logged.due(f"{client_key(peer_ip)}/{reason}")
        if due:
            log.warning(
                "WireGuard stream refused",
                extra=kv(client=peer_ip, reason=reason, detail=detail, since_last_logged=unlogged),
            )

    @staticmethod
    def loop_time() -> float:
        return asyncio.get_running_loop().time()

    # -- what the gateway reports per agent ---------------------------------------------

    def transport_of(self, endpoint: str | None) -> str:
        """``tcp`` if a WireGuard peer's endpoint is one of our streams, else ``udp``."""
        if endpoint is None:
            return "udp"
        if endpoint in self._endpoints or endpoint.startswith(("wss:", "ws:")):
            return "tcp"
        return "udp"

    def record_peer(self, agent: str, endpoint: str | None) -> str:
        """Set an agent's transport (and its stream's queueing delay) in the metrics;
        returns the transport."""
        transport = self.transport_of(endpoint)
        other = "udp" if transport == "tcp" else "tcp"
        self._transport.set(1, agent=agent, transport=transport)
        self._transport.remove(agent=agent, transport=other)
        session = self._endpoints.get(endpoint or "")
        delay = session.stream.queueing_delay if session and session.stream else None
        if delay is None:
            self._delay.remove(agent=agent)
        else:
            self._delay.set(delay, agent=agent)
        return transport

    def forget_peer(self, agent: str) -> None:
        for transport in ("udp", "tcp"):
            self._transport.remove(agent=agent, transport=transport)
        self._delay.remove(agent=agent)

    async def close(self) -> None:
        """End every stream (shutdown)."""
        self.closing = True
        sessions = list(self.sessions)
        for session in sessions:
            if session.stream is not None:
                session.stream.close("gateway shutting down", 1001)
        waits = [s.stream.closed for s in sessions if s.stream is not None]
        if waits:
            await asyncio.wait(waits, timeout=3.0)
        for session in list(self.sessions):
            if session.stream is not None:
                session.stream.abort()
            self._gone(session, "gateway shutting down", "shutdown")


def _reason_of(detail: str, closing: bool) -> str:
    if closing:
        return "shutdown"
    if detail.startswith("protocol error"):
        return "protocol_error"
    if detail.startswith(("nothing received", "no pong")):
        return "dead"
    return "closed"


def engine_binding(sock: Callable[[], WireGuardSocket | None]) -> BindingFactory:
    """Bindings for the userspace backend (``sock`` returns its engine's socket)."""

    def bind(session: _Session) -> Binding:
        udp = sock()
        if udp is None:
            raise OSError("the WireGuard socket is not open")
        address = StreamAddress(session.scheme, session.label)
        return EngineBinding(udp, address, session)

    return bind


def relay_binding(port: int) -> BindingFactory:
    """Bindings for the kernel / wireguard-go backends (the interface's UDP port)."""

    def bind(session: _Session) -> Binding:
        return RelayBinding(port, session, session.loop)

    return bind
