"""``common.relay.pipe``: the protocol-level splice over real loopback sockets and
over the user-space netstack: bytes exact both ways, half-close, back-pressure, the idle
deadline, a reset passed on as a reset, bytes that arrive before the second end."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from common.relay.pipe import TransportSplice
from tests.common.test_splice import Streams, socket_pair


@contextlib.asynccontextmanager
async def piped(
    idle_timeout: float = 30.0, *, late_b: bool = False
) -> AsyncIterator[tuple[Streams, Streams, TransportSplice, asyncio.Transport]]:
    """``a`` ⇄ TransportSplice ⇄ ``b``: the outer ends, the splice, b's inner transport.

    With ``late_b`` the splice is not started: the caller calls ``splice.start()``.
    """
    async with socket_pair() as (a, a_inner), socket_pair() as (b_inner, b):
        splice = TransportSplice(idle_timeout=idle_timeout)
        b_transport = b_inner[1].transport
        splice.attach(splice.a, a_inner[1].transport)
        splice.attach(splice.b, b_transport)
        if not late_b:
            splice.start()
        try:
            yield a, b, splice, b_transport
        finally:
            splice.abort()


async def test_bytes_both_ways_and_half_close() -> None:
    async with asyncio.timeout(20), piped() as ((ar, aw), (br, bw), splice, _):
        up = os.urandom(3 * 1024 * 1024 + 5)
        down = os.urandom(2 * 1024 * 1024 + 3)

        async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
            writer.write(data)
            await writer.drain()
            writer.write_eof()

        sent = asyncio.gather(send(aw, up), send(bw, down))
        got_b, got_a = await asyncio.gather(br.read(), ar.read())
        await sent
        assert hashlib.sha256(got_b).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_a).digest() == hashlib.sha256(down).digest()
        assert await splice.done == (len(up), len(down))


async def test_half_closed_direction_keeps_the_other_flowing() -> None:
    async with asyncio.timeout(10), piped() as ((ar, aw), (br, bw), splice, _):
        aw.write(b"request")
        aw.write_eof()
        assert await br.read() == b"request"
        bw.write(b"answer after the EOF")
        await bw.drain()
        assert await ar.readexactly(20) == b"answer after the EOF"
        assert not splice.done.done()
        bw.write_eof()
        assert await ar.read() == b""
        assert await splice.done == (7, 20)


async def test_a_reset_is_passed_on_as_a_reset() -> None:
    async with asyncio.timeout(10), piped() as ((_ar, aw), (br, _bw), splice, _):
        aw.write(b"x")
        assert await br.readexactly(1) == b"x"
        sock = aw.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        aw.transport.abort()  # with linger 0: an RST towards the splice
        with pytest.raises(ConnectionResetError):
            await br.read()  # b sees a reset, not a clean end
        with pytest.raises(ConnectionError):
            await splice.done


async def test_both_directions_idle_ends_the_splice() -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10), piped(0.3) as ((_ar, aw), (br, _bw), splice, _):
        aw.write(b"x")
        assert await br.readexactly(1) == b"x"
        quiet_from = loop.time()
        with pytest.raises(TimeoutError):
            await splice.done
        assert 0.25 <= loop.time() - quiet_from < 3.0


async def test_one_way_stream_is_not_cut_by_the_idle_deadline() -> None:
    async with asyncio.timeout(10), piped(0.3) as ((_ar, aw), (br, bw), splice, _):
        for i in range(12):  # 1.2 s of a trickle one way, four idle periods
            aw.write(bytes([i]))
            await aw.drain()
            assert await br.readexactly(1) == bytes([i])
            await asyncio.sleep(0.1)
        assert not splice.done.done()
        aw.write_eof()
        bw.write_eof()
        assert await splice.done == (12, 0)


async def test_a_slow_receiver_back_pressures_the_sender() -> None:
    async with asyncio.timeout(30), piped() as ((_ar, aw), (br, _bw), _splice, b_transport):
        block = os.urandom(1024 * 1024)
        accepted = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                for _ in range(64):  # 64 MiB offered, b reads nothing
                    aw.write(block)
                    await aw.drain()
                    accepted += len(block)
        assert accepted <= 16 * 1024 * 1024
        # what the splice holds is bounded by b's write buffer limit (plus one read)
        assert b_transport.get_write_buffer_size() <= 2 * 1024 * 1024
        aw.write_eof()
        got = await br.read()
        assert len(got) >= accepted and got == block * (len(got) // len(block))


async def test_bytes_before_the_second_end_starts_are_kept_in_order() -> None:
    async with asyncio.timeout(10), piped(late_b=True) as ((_ar, aw), (br, bw), splice, _):
        aw.write(b"early ")
        aw.write_eof()
        await asyncio.sleep(0.1)  # arrives (and the EOF too) before start()
        splice.start(b"prefix ")
        assert await br.read() == b"prefix early "
        bw.write_eof()
        assert await splice.done == (13, 0)  # the prefix counts as a → b


async def test_the_second_end_may_answer_before_the_splice_starts() -> None:
    async with asyncio.timeout(10), piped(late_b=True) as ((ar, aw), (_br, bw), splice, _):
        bw.write(b"greeting")  # a server that speaks first, then closes its side
        bw.write_eof()
        assert await ar.readexactly(8) == b"greeting"
        assert await ar.read() == b""  # its EOF too, before start()
        splice.start()
        aw.write_eof()
        assert await splice.done == (0, 8)
