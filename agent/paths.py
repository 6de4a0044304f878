"""Which path carries a gateway's WireGuard datagrams: UDP or the stream (sans-IO).

Theory of operation
-------------------
One :class:`PathPolicy` per gateway decides, from what WireGuard shows and the clock
it is given, whether the gateway's datagrams go over UDP (the normal path) or over the
stream transport (a WebSocket over TLS to the gateway's HTTPS port, ``common.wgstream``)
and what to do next.  ``tick(now, seen)`` is called twice a second with an
:class:`Observation` of the gateway's WireGuard peer; the owner
(:mod:`agent.streams`) reports what happened to the stream (``stream_up``,
``stream_down``) and to UDP probes (``udp_probe_sent``, ``udp_answered``) and carries
out the :class:`Action` values the calls return.  The rules (``--transport auto``):

1. **UDP first.**  A gateway starts on UDP.  If a handshake has been waiting for an
   answer for ``fallback_after`` seconds (the first one never completes: UDP is
   blocked), or the path *goes silent* (we sent, and nothing authenticated came back
   for ``silent_after`` seconds although a probe through the tunnel -- which the
   gateway always answers -- went out ``probe_after`` seconds into the silence), the
   stream is wanted: ``CONNECT``, retried with back-off (1 s doubling to 60 s) while
   it fails.  (4 s is shorter than WireGuard's 5 s retransmission: on a lossy but
   working UDP path a single lost handshake message also moves the gateway onto the
   stream, and the next UDP probe brings it back -- a detour, never an outage.)
2. **Stream up.**  ``USE_STREAM`` moves the gateway's datagrams onto it (WireGuard's
   sessions stay: tunnelled TCP connections see a pause, not a reset) and
   ``INITIATE`` asks for a handshake over it until one completes there (the gateway
   closes a stream that brings no handshake within 10 s).
3. **Keep probing UDP.**  Every ``udp_probe_interval`` seconds on the stream,
   ``PROBE_UDP``: one handshake initiation goes over UDP instead.  If its response
   comes back over UDP (``udp_answered``), UDP works both ways again: ``USE_UDP``,
   and the stream is closed ``stream_linger`` seconds later (what was in flight on it
   still arrives).  If not, WireGuard retransmits the initiation 5 s later, over the
   stream, and nothing is disturbed.
4. **Stream lost** (closed, or silent as in rule 1): back to rule 1 on UDP, so a
   network that lets UDP through again is used at once, and one that does not falls
   back again.

``--transport udp`` never uses the stream; ``--transport tcp`` uses only the stream
(reconnected with back-off; never a UDP probe).  ``reason`` says why the last switch
happened, for the logs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

AUTO, UDP, TCP = "auto", "udp", "tcp"
TRANSPORTS = (AUTO, UDP, TCP)
DOWN, CONNECTING, UP = "down", "connecting", "up"

FALLBACK_AFTER = 4.0
PROBE_AFTER = 3.0
SILENT_AFTER = 8.0
UDP_PROBE_INTERVAL = 10.0
STREAM_LINGER = 5.0
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0


class Action(enum.Enum):
    """What the owner does for a policy (``agent/streams.py``)."""

    CONNECT = "connect"  # open the stream (it reports stream_up / stream_down)
    USE_STREAM = "use_stream"  # route the gateway's datagrams onto the stream
    USE_UDP = "use_udp"  # route them back to UDP
    INITIATE = "initiate"  # ask WireGuard for a handshake (it rate-limits itself)
    PROBE_UDP = "probe_udp"  # one initiation over UDP (reports udp_probe_sent)
    PROBE_TUNNEL = "probe_tunnel"  # a packet through the tunnel the gateway answers
    CLOSE_STREAM = "close_stream"


@dataclass(frozen=True, slots=True)
class Observation:
    """The gateway's WireGuard peer as the engine shows it (times on the policy's
    clock)."""

    initiating: bool  # an initiation is out, not answered yet
    last_sent_handshake: float  # -inf: never
    last_handshake: float | None  # None: never
    rx_bytes: int
    tx_bytes: int


class PathPolicy:
    """The path choice for one gateway (see the module docstring)."""

    def __init__(self, now: float, transport: str = AUTO, *, stream_available: bool = True) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}")
        self.transport = transport
        self.stream_available = stream_available
        #: the path the gateway's datagrams take now: UDP, or TCP (the stream)
        self.path = TCP if transport == TCP else UDP
        #: why the path is what it is (for logs and /healthz)
        self.reason = "--transport tcp" if transport == TCP else "start"
        #: the stream: down, connecting or up (reported by the owner)
        self.stream = DOWN
        #: times the path changed
        self.switches = 0
        self._want = transport == TCP  # rule 1 found UDP failing (or tcp is forced)
        self._want_reason = self.reason
        self._path_since = now
        self._pending_since: float | None = None
        self._rx = self._tx = -1
        self._tx_since_rx = False  # sent something since the last thing received
        self._unanswered_since = now  # when that first send was seen
        self._probe_at: float | None = None  # the last tunnel probe into this silence
        self._first_probe: float | None = None  # the first one
        self._next_connect = now
        self._backoff = BACKOFF_MIN
        self._next_udp_probe = now + UDP_PROBE_INTERVAL
        self._udp_probe_out = False
        self._close_stream_at: float | None = None
        self._handshake_needed = False

    # -- inputs ---------------------------------------------------------------------------

    def tick(self, now: float, seen: Observation) -> list[Action]:
        """Evaluate the rules with what WireGuard shows now."""
        actions: list[Action] = []
        self._watch(now, seen)
        if (
            self.transport == AUTO
            and self.path == UDP
            and not self._want
            and self.stream_available
            and self._udp_failing(now)
        ):
            self._want = True
            self._want_reason = self._why(now, seen)
        if (
            self._want
            and self.stream == DOWN
            and self.stream_available
            and now >= self._next_connect
        ):
            self.stream = CONNECTING
            actions.append(Action.CONNECT)
        if self.stream == UP:
            if self._want and self.path == UDP:
                actions += self._use_stream(now)
            elif self.path == TCP:
                if self._handshake_needed:
                    last = seen.last_handshake
                    if last is not None and last >= self._path_since:
                        self._handshake_needed = False
                    else:
                        actions.append(Action.INITIATE)
                if self._silent(now):
                    actions.append(Action.CLOSE_STREAM)  # the owner reports stream_down
                elif self.transport == AUTO and now >= self._next_udp_probe:
                    actions.append(Action.PROBE_UDP)
            elif self._close_stream_at is not None and now >= self._close_stream_at:
                self._close_stream_at = None
                actions.append(Action.CLOSE_STREAM)
        if self._probe_due(now):
            self._probe_at = now
            if self._first_probe is None:
                self._first_probe = now
            actions.append(Action.PROBE_TUNNEL)
        return actions

    def stream_up(self, now: float) -> list[Action]:
        """The stream is open (its WebSocket handshake done)."""
        self.stream = UP
        self._backoff = BACKOFF_MIN
        if self._want:
            return self._use_stream(now)
        return [Action.CLOSE_STREAM]  # UDP recovered while we connected

    def stream_down(self, now: float, why: str) -> list[Action]:
        """The stream closed, or could not be opened (``why``)."""
        self.stream = DOWN
        self._close_stream_at = None
        self._next_connect = now + self._backoff
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        if self.path == TCP and self.transport == AUTO:
            self._want = False  # rule 4: UDP first again
            self._switch(now, UDP, f"stream lost: {why}")
            return [Action.USE_UDP]
        return []

    def udp_probe_sent(self, now: float) -> None:
        """A probe initiation went out over UDP."""
        self._udp_probe_out = True
        self._next_udp_probe = now + UDP_PROBE_INTERVAL

    def udp_answered(self, now: float) -> list[Action]:
        """A handshake response came back over UDP (to a probe)."""
        if self.path != TCP or self.transport != AUTO or not self._udp_probe_out:
            return []
        self._want = False
        self._switch(now, UDP, "UDP answers again")
        self._close_stream_at = now + STREAM_LINGER
        return [Action.USE_UDP]

    def reset(self, now: float, *, stream_available: bool) -> list[Action]:
        """The gateway moved (a new endpoint): start over (UDP first, unless forced)."""
        self.stream_available = stream_available
        actions = [Action.CLOSE_STREAM] if self.stream != DOWN else []
        self.stream = DOWN
        self._backoff = BACKOFF_MIN
        self._next_connect = now
        self._want = self.transport == TCP
        if self.path == TCP and self.transport == AUTO:
            actions.append(Action.USE_UDP)
        self._switch(now, self.path if self.transport == TCP else UDP, "gateway moved")
        return actions

    # -- rules ------------------------------------------------------------------------------

    def _use_stream(self, now: float) -> list[Action]:
        self._switch(now, TCP, self._want_reason)
        self._handshake_needed = True
        return [Action.USE_STREAM, Action.INITIATE]

    def _watch(self, now: float, seen: Observation) -> None:
        if seen.rx_bytes != self._rx:
            if self._rx >= 0:
                self._tx_since_rx = False
                self._probe_at = self._first_probe = None
            self._rx = seen.rx_bytes
        if seen.tx_bytes != self._tx:
            if self._tx >= 0 and not self._tx_since_rx:
                self._tx_since_rx = True
                self._unanswered_since = now
            self._tx = seen.tx_bytes
        if seen.initiating:
            if self._pending_since is None:
                self._pending_since = max(self._path_since, seen.last_sent_handshake)
        else:
            self._pending_since = None

    def _udp_failing(self, now: float) -> bool:
        pending = self._pending_since
        return (pending is not None and now - pending >= FALLBACK_AFTER) or self._silent(now)

    def _silent(self, now: float) -> bool:
        """We sent, nothing came back for SILENT_AFTER, and a probe had time to."""
        return (
            self._tx_since_rx
            and now - self._unanswered_since >= SILENT_AFTER
            and self._first_probe is not None
            and now - self._first_probe >= PROBE_AFTER
        )

    def _probe_due(self, now: float) -> bool:
        if not self._tx_since_rx or now - self._unanswered_since < PROBE_AFTER:
            return False
        if self.path == TCP and self.stream != UP:
            return False
        return self._probe_at is None or now - self._probe_at >= PROBE_AFTER

    def _why(self, now: float, seen: Observation) -> str:
        pending = self._pending_since
        if pending is not None and now - pending >= FALLBACK_AFTER:
            if seen.last_handshake is None:
                return f"no WireGuard handshake over UDP within {FALLBACK_AFTER:g}s"
            return f"a WireGuard handshake over UDP unanswered for {FALLBACK_AFTER:g}s"
        return f"nothing back over UDP for {SILENT_AFTER:g}s"

    def _switch(self, now: float, path: str, reason: str) -> None:
        if path != self.path:
            self.switches += 1
        self.path = path
        self.reason = reason
        self._path_since = now
        self._tx_since_rx = False
        self._probe_at = self._first_probe = None
        self._pending_since = None
        self._udp_probe_out = False
        self._next_udp_probe = now + UDP_PROBE_INTERVAL
        if path == UDP:
            self._handshake_needed = False
