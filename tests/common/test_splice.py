"""``common.relay.splice``: bytes exact both ways, half-close, the one idle deadline
for the pair (both directions quiet → ``TimeoutError``; a one-way stream is never cut),
and back-pressure, over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from common.relay.splice import splice

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def socket_pair() -> AsyncIterator[tuple[Streams, Streams]]:
    """Two ends of one loopback TCP connection: (client side, server side)."""
    accepted: asyncio.Future[Streams] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await asyncio.open_connection("127.0.0.1", port)
    far = await asyncio.wait_for(accepted, 5)
    try:
        yield client, far
    finally:
        for _, writer in (client, far):
            writer.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def spliced(idle_timeout: float) -> AsyncIterator[tuple[Streams, Streams, asyncio.Task]]:
    """``a`` ⇄ splice ⇄ ``b``: returns the outer ends and the splice task."""
    async with socket_pair() as (a, a_inner), socket_pair() as (b_inner, b):
        task = asyncio.ensure_future(
            splice(a_inner[0], a_inner[1], b_inner[0], b_inner[1], idle_timeout=idle_timeout)
        )
        try:
            yield a, b, task
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def test_bytes_both_ways_and_half_close() -> None:
    async with asyncio.timeout(20), spliced(30) as ((ar, aw), (br, bw), task):
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
        assert await task == (len(up), len(down))


async def test_half_closed_direction_keeps_the_other_flowing() -> None:
    async with asyncio.timeout(10), spliced(30) as ((ar, aw), (br, bw), task):
        aw.write(b"request")
        aw.write_eof()
        assert await br.read() == b"request"  # EOF arrived at b
        bw.write(b"answer after the EOF")
        await bw.drain()
        assert await ar.readexactly(20) == b"answer after the EOF"
        bw.write_eof()
        assert await task == (7, 20)


async def test_both_directions_idle_ends_the_splice() -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10), spliced(0.3) as ((_ar, aw), (br, _bw), task):
        aw.write(b"x")
        assert await br.readexactly(1) == b"x"
        quiet_from = loop.time()
        with pytest.raises(TimeoutError):
            await task
        assert 0.25 <= loop.time() - quiet_from < 3.0


async def test_one_way_stream_is_not_cut_by_the_idle_deadline() -> None:
    async with asyncio.timeout(10), spliced(0.3) as ((_ar, aw), (br, bw), task):
        # a → b moves every 0.1 s for 1.2 s (four idle periods); b → a stays silent
        for i in range(12):
            aw.write(bytes([i]))
            await aw.drain()
            assert await br.readexactly(1) == bytes([i])
            await asyncio.sleep(0.1)
        assert not task.done()
        aw.write_eof()
        bw.write_eof()
        assert await task == (12, 0)


async def test_a_slow_receiver_back_pressures_the_sender() -> None:
    async with asyncio.timeout(30), spliced(30) as ((_ar, aw), (br, _bw), _task):
        block = os.urandom(1024 * 1024)
        accepted = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                for _ in range(64):  # 64 MiB offered, b reads nothing
                    aw.write(block)
                    await aw.drain()
                    accepted += len(block)
        # socket buffers and the splice's one chunk in flight, not the 64 MiB
        assert accepted <= 16 * 1024 * 1024
        # once b reads, everything accepted arrives, in order
        aw.write_eof()
        got = await br.read()
        assert len(got) >= accepted and got == block * (len(got) // len(block))
