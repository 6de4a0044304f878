"""The agent's transports to each gateway: UDP, or WireGuard over a WebSocket stream.

Theory of operation
-------------------
:class:`Transports` belongs to the agent's data plane (``agent/device.py``).  For every
gateway it keeps a :class:`~agent.paths.PathPolicy` (the rules: UDP first, the stream
when UDP fails, back to UDP when it answers again) and carries out what the policy
asks, twice a second (:meth:`Transports.tick`, from the data plane's watch loop) and
whenever the stream opens or closes:

* the stream is :func:`common.wgstream.open_stream` to the gateway's
  ``streamEndpoint`` (its HTTPS listener; TLS without certificate checks, since
  WireGuard authenticates every datagram); what arrives on it is fed to our WireGuard
  as if it came from the gateway's UDP endpoint (``WireGuardSocket.receive_routed``);
* "use the stream" routes the gateway's UDP endpoint to the stream
  (``WireGuardSocket.route``): WireGuard keeps its peer, sessions and timers and only
  the bytes take another path, so tunnelled TCP connections pause, never reset;
  "use UDP" removes the route.  With ``--transport tcp`` the route exists from the
  start, so nothing ever leaves over UDP;
* a UDP probe lifts the route for one handshake initiation; our socket tells us
  (``WireGuardSocket.watch``) when a handshake response then arrives over UDP from
  the gateway and completes the handshake: UDP works both ways;
* a tunnel probe is the data plane's SYN to the gateway's discard port, which a live
  gateway answers with a reset.

Every switch is logged with its reason and counted; ``describe`` feeds ``/healthz``;
the metrics say which transport each gateway uses, the stream's round trip and
queueing delay (a ping's round trip above the smallest seen: how long the outer
TCP's buffers make tunnelled packets wait) and datagrams dropped at its bounded
buffer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common import __version__
from common.logs import OncePer, kv
from common.protocol import check_endpoint
from common.relay.metrics import Registry
from common.wgstream import DatagramStream, StreamError, StreamSettings, open_stream
from netstack.tunnel import UserspaceTunnel
from netstack.wireguard.messages import MESSAGE_RESPONSE
from netstack.wireguard.peer import HandshakeStage, Peer

from .paths import AUTO, TCP, UDP, Action, Observation, PathPolicy

log = logging.getLogger("agent.transport")

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Gateway:
    """What the transports need to know of one gateway."""

    public_key: str
    label: str
    endpoint: tuple[str, int] | None
    stream_endpoint: tuple[str, int] | None
    probe_address: str | None  # its tunnel address, for probes


class _Link:
    """One gateway's transports: its policy, its stream, the route onto it."""

    def __init__(self, gateway: Gateway, policy: PathPolicy) -> None:
        self.gateway = gateway
        self.policy = policy
        self.stream: DatagramStream | None = None
        self.task: asyncio.Task[None] | None = None
        self.routed: tuple[str, int] | None = None
        self.dropped = 0  # datagrams for a stream that was not open
        self.reported_dropped = 0

    def send_datagrams(self, datagrams: list[bytes]) -> None:
        """The route's sink: what WireGuard sends this gateway while on the stream."""
        stream = self.stream
        if stream is not None and stream.is_open:
            stream.send_datagrams(datagrams)
        else:
            self.dropped += len(datagrams)


class Transports:
    """UDP or the stream, per gateway (see the module docstring)."""

    def __init__(
        self,
        tunnel: UserspaceTunnel,
        transport: str = AUTO,
        *,
        registry: Registry | None = None,
        probe: Callable[[str], Awaitable[None]] | None = None,
        settings: StreamSettings | None = None,
    ) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.settings = settings or StreamSettings()
        self._probe = probe
        self._links: dict[str, _Link] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures = OncePer(60.0)
        self._closed = False
        self._metrics = _TransportMetrics(registry) if registry is not None else None

    # -- configuration ----------------------------------------------------------------------

    def update(self, gateways: list[Gateway]) -> None:
        """Follow the configured gateways (new ones start on UDP, unless forced)."""
        now = self._now()
        wanted = {g.public_key: g for g in gateways}
        for key in list(self._links.keys() - wanted.keys()):
            self._drop(self._links.pop(key))
        for key, gateway in wanted.items():
            link = self._links.get(key)
            if link is None:
                policy = PathPolicy(
                    now, self.transport, stream_available=gateway.stream_endpoint is not None
                )
                link = self._links[key] = _Link(gateway, policy)
                if self.transport == TCP:
                    self._route(link)  # nothing may leave over UDP, even before the stream
                    if gateway.stream_endpoint is None:
                        log.error(
                            "gateway offers no stream transport; unreachable with --transport tcp",
                            extra=kv(gateway=gateway.label),
                        )
                self._watch(link)
                self._set_metric(link)
            elif link.gateway != gateway:
                moved = (link.gateway.endpoint, link.gateway.stream_endpoint) != (
                    gateway.endpoint,
                    gateway.stream_endpoint,
                )
                self._unroute(link)
                self._unwatch(link)
                link.gateway = gateway
                self._watch(link)
                if moved:
                    available = gateway.stream_endpoint is not None
                    self._run(link, link.policy.reset(now, stream_available=available))
                if link.policy.path == TCP:
                    self._route(link)

    # -- the clock ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Evaluate every gateway's policy (twice a second)."""
        if self._closed:
            return
        now = self._now()
        for link in list(self._links.values()):
            seen = self._observe(link)
            if seen is not None:
                self._run(link, link.policy.tick(now, seen))
            self._set_metric(link)

    # -- what the health and metrics say --------------------------------------------------------

    def describe(self, public_key: str) -> tuple[str, str]:
        """(``udp``/``tcp``, why) for a gateway."""
        link = self._links.get(public_key)
        if link is None:
            return UDP, ""
        return link.policy.path, link.policy.reason

    def stream_of(self, public_key: str) -> DatagramStream | None:
        link = self._links.get(public_key)
        return link.stream if link is not None else None

    # -- actions --------------------------------------------------------------------------------

    def _run(self, link: _Link, actions: list[Action]) -> None:
        for action in actions:
            if action is Action.CONNECT:
                self._spawn(self._connect(link))
            elif action is Action.USE_STREAM:
                self._route(link)
                self._switched(link, TCP)
                # at once, not when WireGuard's 5 s rate limit allows: the initiations
                # so far took a path that does not answer
                self._initiate(link, force=True)
            elif action is Action.USE_UDP:
                if self.transport != TCP:
                    self._unroute(link)
                self._switched(link, UDP)
            elif action is Action.INITIATE:
                self._initiate(link)
            elif action is Action.PROBE_UDP:
                self._probe_udp(link)
            elif action is Action.PROBE_TUNNEL:
                address = link.gateway.probe_address
                if self._probe is not None and address is not None:
                    self._spawn(self._probe(address))
            elif action is Action.CLOSE_STREAM:
                if link.stream is not None:
                    link.stream.close("not needed" if link.policy.path == UDP else "silent")
                elif link.task is not None:
                    link.task.cancel()

    def _initiate(self, link: _Link, *, force: bool = False) -> None:
        peer = self._peer(link)
        udp = self.tunnel.udp
        if peer is not None and udp is not None:
            self.tunnel.device.initiate_handshake(peer.public_key, udp.now(), force=force)
            udp.flush()

    async def _connect(self, link: _Link) -> None:
        target = link.gateway.stream_endpoint
        if target is None:
            self._run(link, link.policy.stream_down(self._now(), "no stream endpoint"))
            return
        host, port = target
        stream: DatagramStream | None = None
        link.task = asyncio.current_task()
        try:
            stream = await open_stream(
                host,
                port,
                on_datagrams=lambda datagrams: self._received(link, datagrams),
                on_closed=lambda reason: self._stream_closed(link, stream, reason),
                settings=self.settings,
                timeout=CONNECT_TIMEOUT,
                user_agent=f"kakuremichi-agent/{__version__}",
            )
        except (OSError, StreamError) as exc:
            self._connect_failed(link, f"{type(exc).__name__}: {exc}")
            return
        except asyncio.CancelledError:
            self._connect_failed(link, "cancelled")
            raise
        finally:
            link.task = None
        if self._closed or self._links.get(link.gateway.public_key) is not link:
            stream.close("gateway removed")
            return
        link.stream = stream
        if self._metrics is not None:
            self._metrics.connects.inc(gateway=link.gateway.label, result="ok")
        log.info(
            "gateway stream connected",
            extra=kv(gateway=link.gateway.label, stream=f"{host}:{port}"),
        )
        self._run(link, link.policy.stream_up(self._now()))

    def _connect_failed(self, link: _Link, why: str) -> None:
        if self._metrics is not None:
            self._metrics.connects.inc(gateway=link.gateway.label, result="failed")
        due, unlogged = self._failures.due(link.gateway.public_key)
        if due:
            log.warning(
                "gateway stream failed",
                extra=kv(gateway=link.gateway.label, error=why[:300], since_last_logged=unlogged),
            )
        if not self._closed and self._links.get(link.gateway.public_key) is link:
            self._run(link, link.policy.stream_down(self._now(), why[:200]))

    def _stream_closed(self, link: _Link, stream: DatagramStream | None, reason: str) -> None:
        if stream is None or link.stream is not stream:
            return  # an old stream, or one that never got going
        link.stream = None
        link.dropped += stream.dropped
        log.info("gateway stream closed", extra=kv(gateway=link.gateway.label, reason=reason))
        if not self._closed and self._links.get(link.gateway.public_key) is link:
            self._run(link, link.policy.stream_down(self._now(), reason))

    def _received(self, link: _Link, datagrams: list[bytes]) -> None:
        endpoint = link.gateway.endpoint
        udp = self.tunnel.udp
        if endpoint is not None and udp is not None:
            udp.receive_routed(datagrams, endpoint)

    def _probe_udp(self, link: _Link) -> None:
        """One handshake initiation over UDP (the route lifted for it)."""
        peer = self._peer(link)
        endpoint = link.gateway.endpoint
        if peer is None or endpoint is None:
            return
        before = peer.last_sent_handshake
        self._unroute(link)
        try:
            self._initiate(link)
        finally:
            self._route(link)
        if peer.last_sent_handshake != before:
            link.policy.udp_probe_sent(self._now())

    def _udp_seen(self, link: _Link, datagrams: list[bytes], now: float) -> None:
        """Datagrams from the gateway over UDP: a response that completed a handshake
        just now proves UDP works both ways."""
        if link.policy.path != TCP:
            return
        peer = self._peer(link)
        if peer is None or peer.last_handshake != now:
            return
        if any(d[:1] == bytes((MESSAGE_RESPONSE,)) for d in datagrams):
            self._run(link, link.policy.udp_answered(now))

    def _switched(self, link: _Link, path: str) -> None:
        log.info(
            "gateway transport switched",
            extra=kv(gateway=link.gateway.label, transport=path, reason=link.policy.reason),
        )
        if self._metrics is not None:
            self._metrics.switches.inc(gateway=link.gateway.label, to=path)
        self._set_metric(link)

    # -- plumbing ----------------------------------------------------------------------------

    def _route(self, link: _Link) -> None:
        endpoint = link.gateway.endpoint
        udp = self.tunnel.udp
        if endpoint is None or udp is None:
            return
        if link.routed is not None and link.routed != endpoint:
            udp.route(link.routed, None)
        udp.route(endpoint, link)
        link.routed = endpoint
        # the engine sends to the peer's current endpoint, which a UDP datagram may
        # have moved (roaming): pin it to the one the route knows
        peer = self._peer(link)
        if peer is not None and peer.endpoint != endpoint:
            self.tunnel.device.set_peer(peer.public_key, endpoint=endpoint)

    def _unroute(self, link: _Link) -> None:
        udp = self.tunnel.udp
        if link.routed is not None and udp is not None:
            if udp.routed(link.routed) is link:
                udp.route(link.routed, None)
            link.routed = None

    def _watch(self, link: _Link) -> None:
        endpoint = link.gateway.endpoint
        udp = self.tunnel.udp
        if endpoint is not None and udp is not None and self.transport == AUTO:
            udp.watch(endpoint, lambda datagrams, now: self._udp_seen(link, datagrams, now))

    def _unwatch(self, link: _Link) -> None:
        endpoint = link.gateway.endpoint
        udp = self.tunnel.udp
        if endpoint is not None and udp is not None:
            udp.watch(endpoint, None)

    def _drop(self, link: _Link) -> None:
        self._unroute(link)
        self._unwatch(link)
        if link.stream is not None:
            link.stream.close("gateway removed")
            link.stream = None
        if link.task is not None:
            link.task.cancel()
        if self._metrics is not None:
            self._metrics.forget(link.gateway.label)

    def _peer(self, link: _Link) -> Peer | None:
        try:
            key = base64.b64decode(link.gateway.public_key, validate=True)
        except ValueError:
            return None
        return self.tunnel.device.peer(key)

    def _observe(self, link: _Link) -> Observation | None:
        peer = self._peer(link)
        if peer is None:
            return None
        return Observation(
            initiating=peer.stage == HandshakeStage.INITIATION_CREATED,
            last_sent_handshake=peer.last_sent_handshake,
            last_handshake=peer.last_handshake,
            rx_bytes=peer.rx_bytes,
            tx_bytes=peer.tx_bytes,
        )

    def _set_metric(self, link: _Link) -> None:
        if self._metrics is not None:
            self._metrics.update(link)

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _now(self) -> float:
        udp = self.tunnel.udp
        return udp.now() if udp is not None else asyncio.get_running_loop().time()

    async def close(self) -> None:
        """Close every stream (the agent is stopping)."""
        self._closed = True
        for link in list(self._links.values()):
            self._drop(link)
        self._links.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def stream_endpoint(text: str | None) -> tuple[str, int] | None:
    """A gateway's ``streamEndpoint`` as (host, port); None when it has none."""
    return None if text is None else check_endpoint(text)


class _TransportMetrics:
    """The agent's metric families for its gateways' transports."""

    def __init__(self, registry: Registry) -> None:
        self.transport = registry.gauge(
            "kakuremichi_gateway_transport",
            "The transport each gateway's WireGuard session uses (1 for udp or tcp).",
            ("gateway", "transport"),
        )
        self.switches = registry.counter(
            "kakuremichi_gateway_transport_switches_total",
            "Times a gateway's WireGuard traffic moved to another transport, by gateway "
            "and the transport it moved to.",
            ("gateway", "to"),
        )
        self.connects = registry.counter(
            "kakuremichi_gateway_stream_connects_total",
            "Attempts to open the stream transport to a gateway, by result (ok, failed).",
            ("gateway", "result"),
        )
        self.rtt = registry.gauge(
            "kakuremichi_gateway_stream_rtt_seconds",
            "Round trip of the last WebSocket ping on a gateway's stream.",
            ("gateway",),
        )
        self.delay = registry.gauge(
            "kakuremichi_gateway_stream_queueing_delay_seconds",
            "The stream's last ping round trip above the smallest seen: how long the "
            "outer connection's buffers hold tunnelled packets.",
            ("gateway",),
        )
        self.dropped = registry.counter(
            "kakuremichi_gateway_stream_dropped_total",
            "WireGuard transport messages to a gateway dropped at the stream's bounded "
            "buffer (or while it was not open).",
            ("gateway",),
        )

    def update(self, link: _Link) -> None:
        label = link.gateway.label
        path = link.policy.path
        self.transport.set(1, gateway=label, transport=path)
        self.transport.remove(gateway=label, transport=UDP if path == TCP else TCP)
        stream = link.stream
        if stream is not None and stream.rtt is not None:
            self.rtt.set(stream.rtt, gateway=label)
            self.delay.set(stream.queueing_delay or 0.0, gateway=label)
        else:
            self.rtt.remove(gateway=label)
            self.delay.remove(gateway=label)
        dropped = link.dropped + (stream.dropped if stream is not None else 0)
        if dropped > link.reported_dropped:
            self.dropped.inc(dropped - link.reported_dropped, gateway=label)
            link.reported_dropped = dropped

    def forget(self, label: str) -> None:
        for transport in (UDP, TCP):
            self.transport.remove(gateway=label, transport=transport)
        self.rtt.remove(gateway=label)
        self.delay.remove(gateway=label)
