"""Keep-alive connections to agents, a few per (agent address, tunnel).

Theory of operation
-------------------
An ``UpstreamConnection`` is one TCP stream to an agent plus the ``h1.ResponseReader``
that frames the responses on it.  After an exchange ends cleanly (the request sent
whole, the response read to its end, keep-alive on both sides: ``reusable()``) the
proxy hands the connection back with ``release``; the pool keeps it idle, at most
``max_idle_per_agent`` per ``(host, port, tunnel)``, each for at most ``idle_timeout``
seconds (one timer for the whole pool sweeps out those idle too long, and a connection
found too old when taken is closed instead).  Anything else - an error, an upgrade, a
``Connection: close``, bytes after the response - is closed instead of pooled.

A connection belongs to one tunnel: the agent splices it to that tunnel's target after
reading the ``preamble`` (a PROXY v2 header naming the tunnel) that ``acquire`` writes
right after dialling, so it is only ever reused for the same tunnel.  The cap on
connections in use (``max_active_per_agent``) counts per agent address, across tunnels.

Agents may close idle keep-alive connections at any moment, so ``acquire`` skips
connections whose reader already saw EOF (or that received anything while idle: a
``Tap`` watches every idle connection), and the proxy retries a request once on a
fresh connection when a *reused* connection fails before any response byte arrived, if
the request is idempotent and has no body (RFC 9110 §9.2.2: replaying it is safe).
Requests that cannot be replayed only take a connection used within the last second,
which narrows the race with an agent closing an idle connection to almost nothing.

When Control reports an agent offline (a replica's agent went away, issue 17),
``abort_agent`` ends its idle connections and those still waiting for a response head,
so their requests fail at once (idempotent ones are retried on another replica)
instead of waiting for a response that cannot come.  Connections already relaying a
response keep going.

**Taps.**  Right after dialling, a ``Tap`` is put between the connection's transport
and its stream protocol (``transport.set_protocol``; kernel sockets under either event
loop and the user-space stack's transports all allow it).  With no ``sink`` the bytes
go on to the ``StreamReader`` as before (the coroutine path of ``forward.py``); with a
sink they are handed to it from the transport's callback: the client session's fast
path (``http.py``) relays a small exchange that way without a task or a future, and an
idle pooled connection's sink is the connection itself, which marks it broken if the
agent sends anything or closes.  ``take_idle`` hands out a tapped idle connection
synchronously, for the fast path.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol, cast

from common.relay.dial import Dialer, open_tcp
from common.relay.splice import close_writer

from .h1 import HEAD, ResponseReader

__all__ = ["Dialer", "PoolBusy", "Sink", "Tap", "UpstreamConnection", "UpstreamPool", "open_tcp"]

MAX_UPSTREAM_HEADER_BYTES = 64 * 1024


class Sink(Protocol):
    """Who takes an agent connection's events from its ``Tap`` instead of the reader."""

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_eof(self) -> None: ...

    def upstream_lost(self, exc: BaseException | None) -> None: ...


class Tap(asyncio.Protocol):
    """Between an agent connection's transport and its ``StreamReaderProtocol``: the
    events go to ``sink`` if one is set, else on to the stream protocol (which always
    hears of EOF, the end of the connection and flow control, so the reader and the
    writer stay truthful for the coroutine path)."""

    __slots__ = ("inner", "sink")

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self.sink: Sink | None = None

    @classmethod
    def install(cls, transport: asyncio.BaseTransport) -> Tap | None:
        """Put a tap on ``transport`` (None if the transport cannot swap protocols)."""
        try:
            inner = transport.get_protocol()
            if not isinstance(inner, asyncio.Protocol) or isinstance(inner, Tap):
                return None
            tap = cls(inner)
            transport.set_protocol(tap)
        except (AttributeError, NotImplementedError):
            return None
        return tap

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            self.inner.data_received(data)
        else:
            sink.upstream_data(data)

    def eof_received(self) -> bool | None:
        keep_open = self.inner.eof_received()
        sink = self.sink
        if sink is not None:
            sink.upstream_eof()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class UpstreamConnection:
    """One stream to an agent with its client-side HTTP/1.1 state."""

    __slots__ = (
        "agent",
        "broken",
        "checked_out",
        "idle_since",
        "key",
        "reader",
        "request_done",
        "responses",
        "reused",
        "tap",
        "transport",
        "writer",
    )

    def __init__(
        self,
        key: tuple[str, int, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.key = key
        self.agent = (key[0], key[1])
        self.reader = reader
        self.writer = writer
        self.responses = ResponseReader(MAX_UPSTREAM_HEADER_BYTES)
        #: the current request went out whole (head and body)
        self.request_done = False
        self.reused = False
        self.checked_out = False
        self.idle_since = 0.0
        self.transport = cast(asyncio.Transport, writer.transport)
        #: None if the transport cannot be tapped (then only the coroutine path uses it)
        self.tap = Tap.install(self.transport)
        #: the agent sent something or closed while the connection was idle
        self.broken = False

    # -- the sink of an idle connection: anything from the agent ends it

    def upstream_data(self, data: bytes) -> None:
        self.broken = True

    def upstream_eof(self) -> None:
        self.broken = True

    def upstream_lost(self, exc: BaseException | None) -> None:
        self.broken = True

    def begin(self, method: bytes, *, upgrade: bool = False) -> None:
        """A request with ``method`` is being sent (``upgrade``: it asks to switch)."""
        self.request_done = False
        self.responses.start(method, upgrade=upgrade)

    def reusable(self) -> bool:
        """The last exchange ended cleanly and both sides allow another."""
        return (
            self.request_done
            and self.responses.reusable()
            and not self.broken
            and not self.reader.at_eof()
        )

    def tap_sink(self, sink: Sink | None) -> None:
        """Where the agent's bytes go from now: ``sink``, or the reader (None)."""
        if self.tap is not None:
            self.tap.sink = sink

    def dead(self) -> bool:
        """The connection cannot carry another exchange (seen while it was idle)."""
        return self.broken or self.reader.at_eof() or self.transport.is_closing()

    async def close(self) -> None:
        await close_writer(self.writer)


class PoolBusy(Exception):
    """The agent already has ``max_active_per_agent`` connections in use."""


class UpstreamPool:
    """Idle keep-alive connections per agent address, and a cap on those in use."""

    def __init__(
        self,
        dialer: Dialer,
        *,
        max_idle_per_agent: int = 8,
        idle_timeout: float = 4.0,
        max_active_per_agent: int = 0,
    ):
        self.dialer = dialer
        self.max_idle_per_agent = max_idle_per_agent
        self.idle_timeout = idle_timeout
        self.max_active_per_agent = max_active_per_agent
        self._idle: dict[tuple[str, int, str], list[UpstreamConnection]] = {}
        self._active: dict[tuple[str, int], int] = {}
        #: connections checked out, per agent host (``abort_agent``)
        self._in_use: dict[str, set[UpstreamConnection]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.dials = 0
        self.reuses = 0

    async def acquire(
        self,
        host: str,
        port: int,
        connect_timeout: float,
        *,
        fresh: bool = False,
        max_idle_age: float | None = None,
        tunnel: str = "",
        preamble: bytes = b"",
    ) -> UpstreamConnection:
        """A pooled connection of ``tunnel`` if a live one is idle (unless ``fresh``),
        else a new one, on which ``preamble`` is written first.

        ``max_idle_age`` skips (and keeps pooled) connections idle for longer than that.
        Dial errors (``OSError``, ``TimeoutError``) propagate to the caller;
        ``PoolBusy`` if the agent's cap of connections in use is reached.
        """
        agent = (host, port)
        key = (host, port, tunnel)
        if self._at_cap(agent):
            raise PoolBusy
        if not fresh:
            upstream = self._take(key, max_idle_age, tapped=False)
            if upstream is not None:
                upstream.tap_sink(None)
                return upstream
        self.dials += 1
        self._active[agent] = self._active.get(agent, 0) + 1  # reserve while dialling
        try:
            reader, writer = await self.dialer(host, port, connect_timeout)
        finally:
            self._return(agent)
        if preamble:
            writer.write(preamble)
        upstream = UpstreamConnection(key, reader, writer)
        self._check_out(upstream)
        return upstream

    def take_idle(
        self, host: str, port: int, tunnel: str, sink: Sink, now: float | None = None
    ) -> UpstreamConnection | None:
        """A live idle connection of ``tunnel`` whose events now go to ``sink``, or None
        (none idle, none tapped, or the agent's cap of connections in use reached: the
        caller then takes the coroutine path, which says so).  ``now`` is the loop's
        time if the caller has it (``asyncio.get_running_loop()`` is not free: it asks
        the kernel for the process id every time)."""
        if self._at_cap((host, port)):
            return None
        upstream = self._take((host, port, tunnel), None, tapped=True, now=now)
        if upstream is not None:
            upstream.tap_sink(sink)
        return upstream

    def _take(
        self,
        key: tuple[str, int, str],
        max_idle_age: float | None,
        *,
        tapped: bool,
        now: float | None = None,
    ) -> UpstreamConnection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        if now is None:
            now = asyncio.get_running_loop().time()
        # newest first: the most recently used connection is the least likely stale
        for index in range(len(idle) - 1, -1, -1):
            upstream = idle[index]
            if self._expired(upstream, now):
                del idle[index]
                self._close_later(upstream)
                continue
            if max_idle_age is not None and now - upstream.idle_since > max_idle_age:
                continue
            if tapped and upstream.tap is None:
                continue
            del idle[index]
            upstream.reused = True
            self.reuses += 1
            self._check_out(upstream)
            if not idle:
                del self._idle[key]
            return upstream
        if not idle:
            del self._idle[key]
        return None

    def _at_cap(self, agent: tuple[str, int]) -> bool:
        """The agent has ``max_active_per_agent`` connections in use (0: no cap)."""
        cap = self.max_active_per_agent
        return bool(cap) and self._active.get(agent, 0) >= cap

    def _expired(self, upstream: UpstreamConnection, now: float) -> bool:
        """An idle connection that must be closed: idle too long, or seen dead."""
        return now - upstream.idle_since >= self.idle_timeout or upstream.dead()

    def _check_out(self, upstream: UpstreamConnection) -> None:
        upstream.checked_out = True
        self._active[upstream.agent] = self._active.get(upstream.agent, 0) + 1
        in_use = self._in_use.get(upstream.key[0])
        if in_use is None:
            in_use = self._in_use[upstream.key[0]] = set()
        in_use.add(upstream)

    def _check_in(self, upstream: UpstreamConnection) -> None:
        if upstream.checked_out:
            upstream.checked_out = False
            self._return(upstream.agent)
            in_use = self._in_use.get(upstream.key[0])
            if in_use is not None:
                in_use.discard(upstream)
                if not in_use:
                    del self._in_use[upstream.key[0]]

    def abort_agent(self, host: str) -> int:
        """End the idle connections to ``host`` and those waiting for a response head
        (its agent is gone: module docstring); returns how many were ended."""
        ended = 0
        for key in [k for k in self._idle if k[0] == host]:
            for upstream in self._idle.pop(key):
                self._close_later(upstream)
                ended += 1
        for upstream in list(self._in_use.get(host, ())):
            if upstream.responses.state == HEAD:
                with contextlib.suppress(Exception):
                    upstream.transport.abort()
                ended += 1
        return ended

    def _return(self, key: tuple[str, int]) -> None:
        count = self._active.get(key, 0) - 1
        if count > 0:
            self._active[key] = count
        else:
            self._active.pop(key, None)

    def active_count(self, host: str, port: int) -> int:
        """Connections to ``host:port`` in use (or being dialled) right now."""
        return self._active.get((host, port), 0)

    def release(self, upstream: UpstreamConnection, now: float | None = None) -> None:
        """Return a connection after a complete exchange; closes it if not reusable
        (``now``: the loop's time, as for ``take_idle``)."""
        self._check_in(upstream)
        if not upstream.reusable() or self.max_idle_per_agent <= 0:
            self._close_later(upstream)
            return
        idle = self._idle.setdefault(upstream.key, [])
        if len(idle) >= self.max_idle_per_agent:
            self._close_later(upstream)
            return
        upstream.idle_since = asyncio.get_running_loop().time() if now is None else now
        upstream.tap_sink(upstream)
        idle.append(upstream)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.idle_timeout / 2, self._sweep
            )

    def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout`` or more; one timer for the whole
        pool (every ``idle_timeout / 2`` while any is idle), none per connection."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key, idle in list(self._idle.items()):
            keep = []
            for upstream in idle:
                if self._expired(upstream, now):
                    self._close_later(upstream)
                else:
                    keep.append(upstream)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = loop.call_later(self.idle_timeout / 2, self._sweep)

    def discard(self, upstream: UpstreamConnection) -> None:
        """Close a connection that must not be reused (idempotent)."""
        self._check_in(upstream)
        self._close_later(upstream)

    def idle_count(self, host: str | None = None, port: int | None = None) -> int:
        """Idle connections in all, or to one agent address (over all its tunnels)."""
        return sum(
            len(v)
            for key, v in self._idle.items()
            if host is None or (key[0] == host and key[1] == (port or 0))
        )

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for upstream in idle:
                self._close_later(upstream)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def _close_later(self, upstream: UpstreamConnection) -> None:
        with contextlib.suppress(Exception):
            upstream.writer.close()
        task = asyncio.ensure_future(upstream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
