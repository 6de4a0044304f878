"""Byte splicing between two asyncio streams, with half-close and back-pressure.

Theory of operation
-------------------
Two pumps run concurrently, one per direction.  Each reads up to ``chunk`` bytes,
writes them to the other side and waits for ``drain()`` before reading again, so a slow
receiver stalls the sender instead of filling memory (back-pressure).  When one side
sends EOF, its pump half-closes the other side with ``write_eof()`` (if the transport
can: TLS cannot, then the direction simply stays quiet) and ends; the other direction
keeps flowing until it too reaches EOF.  An error in either direction (reset, broken
pipe) aborts both.  One idle deadline covers the pair: a single timer, moved forward
lazily (it is re-armed only when it fires and finds that something moved since), ends
the splice if *neither* direction moved for ``idle_timeout`` seconds, so a one-way
stream (server push, a long download) is not cut, and a read costs no timer of its
own (an ``asyncio.timeout`` per read was ~4 µs each, a large share of a small
request's cost through the tunnel).

Only the StreamReader/StreamWriter API is used, so the same code splices kernel
sockets and the userspace netstack's streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

CHUNK = 64 * 1024


_LINGER_ZERO = struct.pack("ii", 1, 0)


def reset(transport: asyncio.BaseTransport) -> None:
    """Abort a transport so that its peer sees a reset: a kernel socket closed with
    ``SO_LINGER`` 0 sends an RST (``abort()`` alone closes it with a FIN); the
    user-space stack's transport sends one on ``abort()``."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(Exception):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    transport.abort()  # type: ignore[attr-defined]


async def close_writer(writer: asyncio.StreamWriter, *, abort: bool = False) -> None:
    """Close a writer without raising; ``abort`` drops buffered data and resets."""
    try:
        if abort:
            transport = writer.transport
            if transport is not None and hasattr(transport, "abort"):
                reset(transport)
        writer.close()
    except Exception:  # noqa: S110 - closing a broken stream must not raise
        pass
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


async def drain(writer: asyncio.StreamWriter, limit: float) -> None:
    """``writer.drain()`` bounded by ``limit`` seconds (``TimeoutError`` beyond).

    Most drains return at once (the transport is below its high-water mark); only a
    paused transport pays for a timer.  Without ``asyncio.timeout`` around every call
    the per-request cost of the proxy is dominated by timer bookkeeping.
    """
    transport = writer.transport
    try:
        paused_possible = transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]
    except (AttributeError, NotImplementedError):
        paused_possible = True
    if not paused_possible:
        await writer.drain()
        return
    async with asyncio.timeout(limit):
        await writer.drain()


def half_close(writer: asyncio.StreamWriter) -> None:
    """Send EOF on a writer if its transport supports it."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()


async def splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    *,
    idle_timeout: float,
    a_to_b_prefix: bytes = b"",
    b_to_a_prefix: bytes = b"",
    on_a_to_b: Callable[[int], None] | None = None,
    on_b_to_a: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Copy a→b and b→a until both directions end; returns the byte counts.

    Does not close the streams (the caller owns them) but half-closes as EOFs arrive.
    Raises ``TimeoutError`` when the pair was idle too long, or the I/O error that
    broke a direction.
    """
    loop = asyncio.get_running_loop()
    last_activity = loop.time()
    timed_out = False
    timer: asyncio.TimerHandle | None = None

    async def pump(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        prefix: bytes,
        on_bytes: Callable[[int], None] | None,
    ) -> int:
        nonlocal last_activity
        total = 0
        if prefix:
            writer.write(prefix)
            await writer.drain()
            total += len(prefix)
            if on_bytes is not None:
                on_bytes(len(prefix))
        while True:
            data = await reader.read(CHUNK)
            if not data:
                half_close(writer)
                return total
            last_activity = loop.time()
            writer.write(data)
            await drain(writer, idle_timeout)
            total += len(data)
            if on_bytes is not None:
                on_bytes(len(data))

    def watchdog() -> None:
        nonlocal timer, timed_out
        deadline = last_activity + idle_timeout
        if loop.time() < deadline:
            timer = loop.call_at(deadline, watchdog)
            return
        timed_out = True
        forward.cancel()
        backward.cancel()

    forward = asyncio.ensure_future(pump(a_reader, b_writer, a_to_b_prefix, on_a_to_b))
    backward = asyncio.ensure_future(pump(b_reader, a_writer, b_to_a_prefix, on_b_to_a))
    timer = loop.call_at(last_activity + idle_timeout, watchdog)
    try:
        done, _ = await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_EXCEPTION)
        if timed_out:
            raise TimeoutError(f"both directions idle for {idle_timeout:g} s")
        for task in done:
            task.result()  # re-raise the first failure
        return forward.result(), backward.result()
    finally:
        if timer is not None:
            timer.cancel()
        for task in (forward, backward):
            if not task.done():
                task.cancel()
        for task in (forward, backward):
            with contextlib.suppress(BaseException):
                await task
