"""Splicing two asyncio transports at the protocol level, with half-close and
back-pressure: the stream splice of ``splice.py`` without its two tasks.

Theory of operation
-------------------
A :class:`TransportSplice` owns two protocols, ``a`` and ``b`` (:class:`PipeEnd`), each
attached to one transport (a kernel socket, a TLS connection or the user-space
netstack's TCP transport: only the ``asyncio.Transport`` API is used).  What one end
receives it writes straight to the other end's transport in ``data_received``: no
task, no future, no ``await`` per chunk.

* **Back-pressure**: when a transport's write buffer passes its high-water mark it
  calls ``pause_writing`` on its protocol, which pauses *reading* on the other
  transport; ``resume_writing`` resumes it.  Memory per splice is bounded by the two
  write buffers' high-water marks plus one read.
* **Half-close**: an EOF from one side is passed on with ``write_eof`` where the other
  transport can (TLS cannot: that direction then just stays quiet) and the transport
  is kept open for the other direction.  When both directions have seen EOF, both
  transports are closed (after their buffered bytes are written).
* **Errors**: a transport lost with an exception (reset, timeout) resets the other
  one (an RST, also on kernel sockets, where a plain ``abort()`` would send a FIN), so
  neither peer mistakes a broken stream for a complete one; a transport lost cleanly
  closes the other one after its buffered bytes.
* **Idle**: one timer for the pair, moved forward lazily (re-armed only when it fires
  and sees activity since): if neither direction moved for ``idle_timeout`` seconds,
  both are aborted and ``done`` fails with ``TimeoutError``.
* **Late second end**: ``a`` may be attached (and receive bytes) before ``b`` is
  connected, e.g. while a target is being dialled; what ``a`` receives meanwhile is
  kept (reading on ``a`` is paused by the caller, so this is at most a read or two)
  and written when the splice starts (:meth:`TransportSplice.start`), after its
  prefix.  ``b`` is connected with ``a`` already attached, so what ``b`` sends (a
  greeting) flows to ``a`` at once, even before ``start``.

``done`` resolves to the byte counts (a→b, b→a) once both transports are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from .splice import reset

ByteCounter = Callable[[int], None]


class PipeEnd(asyncio.Protocol):
    """One side of a :class:`TransportSplice` (see the module docstring)."""

    __slots__ = ("eof", "lost", "on_bytes", "peer", "splice", "total", "transport")

    def __init__(self, splice: TransportSplice, on_bytes: ByteCounter | None) -> None:
        self.splice = splice
        self.on_bytes = on_bytes
        self.transport: asyncio.Transport | None = None
        self.peer: PipeEnd = self  # set by TransportSplice
        self.eof = False
        self.lost = False
        self.total = 0

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        splice = self.splice
        splice.last_activity = splice.loop.time()
        peer = self.peer.transport
        if peer is None or (not splice.started and self is splice.a):
            splice.early.append(data)  # a → b before b is connected (and its prefix sent)
        elif not self.peer.lost:
            peer.write(data)  # b → a may flow as soon as b is connected
        self.total += len(data)
        if self.on_bytes is not None:
            self.on_bytes(len(data))

    def eof_received(self) -> bool:
        self.eof = True
        splice = self.splice
        peer = self.peer.transport
        if peer is not None and (splice.started or self is splice.b) and not self.peer.lost:
            with contextlib.suppress(Exception):
                if peer.can_write_eof():
                    peer.write_eof()
        splice.check_both_eof()
        # TLS transports close on EOF whatever we answer (and warn if we say True)
        transport = self.transport
        return transport is not None and transport.get_extra_info("sslcontext") is None

    def pause_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None and not self.peer.lost:
            with contextlib.suppress(Exception):
                peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None and not self.peer.lost:
            with contextlib.suppress(Exception):
                peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.splice.end_lost(self, exc)


class TransportSplice:
    """Two :class:`PipeEnd` protocols joined back to back (see the module docstring)."""

    def __init__(
        self,
        *,
        idle_timeout: float,
        on_a_to_b: ByteCounter | None = None,
        on_b_to_a: ByteCounter | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = idle_timeout
        self.a = PipeEnd(self, on_a_to_b)
        self.b = PipeEnd(self, on_b_to_a)
        self.a.peer, self.b.peer = self.b, self.a
        self.started = False
        self.early: list[bytes] = []
        self.last_activity = self.loop.time()
        self.done: asyncio.Future[tuple[int, int]] = self.loop.create_future()
        self._error: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None

    def attach(self, end: PipeEnd, transport: asyncio.Transport) -> None:
        """Take over an already connected transport as ``end`` (its protocol is replaced;
        the other end may instead be connected with ``end`` as its protocol)."""
        transport.set_protocol(end)
        end.connection_made(transport)

    def start(self, prefix: bytes = b"") -> None:
        """Both ends are attached: write ``prefix`` (bytes ``a`` sent before the splice
        took it over; counted as a→b) and what ``a`` sent early to ``b``, pass on an
        early EOF, resume reading on ``a``, arm the idle timer."""
        a, b = self.a.transport, self.b.transport
        assert a is not None and b is not None
        self.started = True
        if self.a.lost or self.b.lost:  # one side went away while the other connected
            for end in (self.a, self.b):
                if not end.lost:
                    b_or_a = end.transport
                    assert b_or_a is not None
                    b_or_a.close()
            self._finish()
            return
        if prefix:
            self.a.total += len(prefix)
            if self.a.on_bytes is not None:
                self.a.on_bytes(len(prefix))
        pending = prefix + b"".join(self.early)
        self.early.clear()
        if pending:
            b.write(pending)
        if self.a.eof:
            with contextlib.suppress(Exception):
                if b.can_write_eof():
                    b.write_eof()
        with contextlib.suppress(Exception):
            a.resume_reading()
        self.last_activity = self.loop.time()
        self._timer = self.loop.call_at(self.last_activity + self.idle_timeout, self._watchdog)
        self.check_both_eof()

    def abort(self, error: BaseException | None = None) -> None:
        """End both directions now (RST where the transport has one)."""
        if error is not None and self._error is None:
            self._error = error
        for end in (self.a, self.b):
            if end.transport is not None and not end.lost:
                reset(end.transport)
        if self.a.transport is None or self.b.transport is None:
            self._finish()

    # -- called by the ends -----------------------------------------------------------

    def check_both_eof(self) -> None:
        if self.started and self.a.eof and self.b.eof:
            for end in (self.a, self.b):
                if end.transport is not None and not end.lost:
                    end.transport.close()

    def end_lost(self, end: PipeEnd, exc: Exception | None) -> None:
        other = end.peer
        if exc is not None and self._error is None:
            self._error = exc
        if other.transport is not None and not other.lost:
            if exc is not None:
                reset(other.transport)
            else:
                other.transport.close()  # after its buffered bytes
        if other.transport is None or other.lost:
            self._finish()

    # -- internals --------------------------------------------------------------------

    def _watchdog(self) -> None:
        deadline = self.last_activity + self.idle_timeout
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._watchdog)
            return
        self._timer = None
        self.abort(TimeoutError(f"both directions idle for {self.idle_timeout:g} s"))

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.done.done():
            return
        if self._error is not None:
            self.done.set_exception(self._error)
            self.done.exception()  # retrieved: callers may not await a failed splice
        else:
            self.done.set_result((self.a.total, self.b.total))
