"""Keep-alive connections to agents, a few per (agent address, tunnel).

Theory of operation
-------------------
An ``UpstreamConnection`` is one TCP stream to an agent plus the ``h1.ResponseReader``
that frames the responses on it.  After an exchange ends cleanly (the request sent
whole, the response read to its end, keep-alive on both sides: ``reusable()``) the
proxy hands the connection back with ``release``; the pool keeps it idle, at most
``max_idle_per_agent`` per ``(host, port, tunnel)``, each for at most ``idle_timeout``
seconds (a timer handle per idle connection closes it; taking it out cancels the
timer).  Anything else - an error, an upgrade, a ``Connection: close``, bytes after
the response - is closed instead of pooled.

A connection belongs to one tunnel: the agent splices it to that tunnel's target after
reading the ``preamble`` (a PROXY v2 header naming the tunnel) that ``acquire`` writes
right after dialling, so it is only ever reused for the same tunnel.  The cap on
connections in use (``max_active_per_agent``) counts per agent address, across tunnels.

Agents may close idle keep-alive connections at any moment, so ``acquire`` skips
connections whose reader already saw EOF, and the proxy retries a request once on a
fresh connection when a *reused* connection fails before any response byte arrived, if
the request is idempotent and has no body (RFC 9110 §9.2.2: replaying it is safe).
Requests that cannot be replayed only take a connection used within the last second,
which narrows the race with an agent closing an idle connection to almost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib

from kakuremichi.relay.dial import Dialer, open_tcp
from kakuremichi.relay.splice import close_writer

from .h1 import ResponseReader

__all__ = ["Dialer", "PoolBusy", "UpstreamConnection", "UpstreamPool", "open_tcp"]

MAX_UPSTREAM_HEADER_BYTES = 64 * 1024


class UpstreamConnection:
    """One stream to an agent with its client-side HTTP/1.1 state."""

    __slots__ = (
        "agent",
        "checked_out",
        "expiry",
        "idle_since",
        "key",
        "reader",
        "request_done",
        "responses",
        "reused",
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
        self.expiry: asyncio.TimerHandle | None = None

    def begin(self, method: bytes, *, upgrade: bool = False) -> None:
        """A request with ``method`` is being sent (``upgrade``: it asks to switch)."""
        self.request_done = False
        self.responses.start(method, upgrade=upgrade)

    def reusable(self) -> bool:
        """The last exchange ended cleanly and both sides allow another."""
        return self.request_done and self.responses.reusable() and not self.reader.at_eof()

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
        self._closing: set[asyncio.Task[None]] = set()
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
        if self.max_active_per_agent and self._active.get(agent, 0) >= self.max_active_per_agent:
            raise PoolBusy
        idle = None if fresh else self._idle.get(key)
        now = asyncio.get_running_loop().time()
        # newest first: the most recently used connection is the least likely stale
        for index in range(len(idle) - 1, -1, -1) if idle else ():
            assert idle is not None
            upstream = idle[index]
            if upstream.reader.at_eof() or upstream.writer.is_closing():
                del idle[index]
                self._cancel_expiry(upstream)
                self._close_later(upstream)
                continue
            if max_idle_age is not None and now - upstream.idle_since > max_idle_age:
                continue
            del idle[index]
            self._cancel_expiry(upstream)
            upstream.reused = True
            self.reuses += 1
            self._check_out(upstream)
            return upstream
        if idle is not None and not idle:
            self._idle.pop(key, None)
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

    def _check_out(self, upstream: UpstreamConnection) -> None:
        upstream.checked_out = True
        self._active[upstream.agent] = self._active.get(upstream.agent, 0) + 1

    def _check_in(self, upstream: UpstreamConnection) -> None:
        if upstream.checked_out:
            upstream.checked_out = False
            self._return(upstream.agent)

    def _return(self, key: tuple[str, int]) -> None:
        count = self._active.get(key, 0) - 1
        if count > 0:
            self._active[key] = count
        else:
            self._active.pop(key, None)

    def active_count(self, host: str, port: int) -> int:
        """Connections to ``host:port`` in use (or being dialled) right now."""
        return self._active.get((host, port), 0)

    def release(self, upstream: UpstreamConnection) -> None:
        """Return a connection after a complete exchange; closes it if not reusable."""
        self._check_in(upstream)
        if not upstream.reusable() or self.max_idle_per_agent <= 0:
            self._close_later(upstream)
            return
        idle = self._idle.setdefault(upstream.key, [])
        if len(idle) >= self.max_idle_per_agent:
            self._close_later(upstream)
            return
        loop = asyncio.get_running_loop()
        upstream.idle_since = loop.time()
        upstream.expiry = loop.call_later(self.idle_timeout, self._expire, upstream)
        idle.append(upstream)

    @staticmethod
    def _cancel_expiry(upstream: UpstreamConnection) -> None:
        if upstream.expiry is not None:
            upstream.expiry.cancel()
            upstream.expiry = None

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
        for idle in self._idle.values():
            for upstream in idle:
                if upstream.expiry is not None:
                    upstream.expiry.cancel()
                self._close_later(upstream)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def _expire(self, upstream: UpstreamConnection) -> None:
        idle = self._idle.get(upstream.key)
        if idle is not None and upstream in idle:
            idle.remove(upstream)
            if not idle:
                del self._idle[upstream.key]
        self._close_later(upstream)

    def _close_later(self, upstream: UpstreamConnection) -> None:
        with contextlib.suppress(Exception):
            upstream.writer.close()
        task = asyncio.ensure_future(upstream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
