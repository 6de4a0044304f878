"""The asyncio adapter: streams, back-pressure, half-close, abort, timeouts, datagrams."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator

import pytest

from netstack.aio import AsyncStack, MemoryLink
from netstack.stack import Stack
from tests.netstack.linkutil import ImpairedLink

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[AsyncStack, AsyncStack, MemoryLink, MemoryLink]]:
    la, lb = MemoryLink.pair()
    a = AsyncStack(Stack(["10.0.0.1", "fd00::1"], rng=random.Random(1)), la)
    b = AsyncStack(Stack(["10.0.0.2", "fd00::2"], rng=random.Random(2)), lb)
    try:
        yield a, b, la, lb
    finally:
        a.close()
        b.close()


async def sha_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    digest = hashlib.sha256()
    while data := await reader.read(1 << 16):
        digest.update(data)
    writer.write(digest.digest())
    await writer.drain()
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("host", ["10.0.0.2", "fd00::2"])
async def test_stream_transfer_and_half_close(
    pair: tuple[AsyncStack, AsyncStack, MemoryLink, MemoryLink], host: str
) -> None:
    a, b, _, _ = pair
    server = await b.start_server(sha_server, 80)
    data = random.Random(4).randbytes(3_000_000)
    reader, writer = await a.open_connection(host, 80, timeout=5)
    assert writer.get_extra_info("peername") == (host, 80)
    writer.write(data)
    await writer.drain()
    assert writer.can_write_eof()
    writer.write_eof()  # half-close: the digest still comes back
    assert await reader.read() == hashlib.sha256(data).digest()
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def test_back_pressure_drain_waits_for_a_slow_reader(
    pair: tuple[AsyncStack, AsyncStack, MemoryLink, MemoryLink],
) -> None:
    a, b, _, _ = pair
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    await b.start_server(hold, 81)
    _reader, writer = await a.open_connection("10.0.0.2", 81, timeout=5)
    server_reader, server_writer = await accepted.get()
    chunk = b"x" * 65536
    total = 0

    async def write_a_lot() -> None:
        nonlocal total
        for _ in range(400):  # 26 MB: far beyond every buffer on the way
            writer.write(chunk)
            total += len(chunk)
            await writer.drain()

    task = asyncio.create_task(write_a_lot())
    await asyncio.sleep(0.5)
    assert not task.done()
    stalled_at = total
    assert stalled_at < 20 * 1024 * 1024  # bounded: the reader took nothing
    server_conn = next(iter(b._transports))
    assert server_conn._rcv_adv - server_conn._rcv_nxt < 1500  # closed window
    received = 0
    while received < 400 * 65536:
        data = await server_reader.read(1 << 20)
        assert data
        received += len(data)
    await task
    writer.close()
    server_writer.close()


async def test_abort_resets_the_peer(
    pair: tuple[AsyncStack, AsyncStack, MemoryLink, MemoryLink],
) -> None:
    a, b, _, _ = pair
    got: asyncio.Future[asyncio.StreamReader] = asyncio.get_running_loop().create_future()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(reader)

    await b.start_server(hold, 82)
    _, writer = await a.open_connection("10.0.0.2", 82, timeout=5)
    server_reader = await got
    writer.transport.abort()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(server_reader.read(), 5)


async def test_connect_refused_and_timeout(
    pair: tuple[AsyncStack, AsyncStack, MemoryLink, MemoryLink],
) -> None:
    a, _, la, _ = pair
    with pytest.raises(ConnectionRefusedError):
        await a.open_connection("10.0.0.2", 9, timeout=5)
    la.filter = lambda packet: False  # a black hole
    with pytest.raises(TimeoutError):
        await a.open_connection("10.0.0.2", 9, timeout=0.3)
    await asyncio.sleep(0.01)  # let the adapter service the aborted connection
    assert a.stack.connection_count == 0  # the aborted attempt is gone


async def test_udp_endpoints(
    pair: tuple[AsyncStack, AsyncStack, MemoryLink, MemoryLink],
) -> None:
    a, b, _, _ = pair
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(data.upper(), addr)  # type: ignore[attr-defined]

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            answers.put_nowait((data, addr))

    echo_transport, _ = await b.create_datagram_endpoint(Echo, 53)
    client_transport, _ = await a.create_datagram_endpoint(Client, 5000)
    client_transport.sendto(b"hello", ("10.0.0.2", 53))
    client_transport.sendto(b"six", ("fd00::2", 53))
    got = {await asyncio.wait_for(answers.get(), 5) for _ in range(2)}
    assert got == {(b"HELLO", ("10.0.0.2", 53)), (b"SIX", ("fd00::2", 53))}
    client_transport.close()
    echo_transport.close()
    await asyncio.sleep(0)
    assert loop.is_running()


async def test_transfer_over_an_impaired_link() -> None:
    la, lb = MemoryLink.pair()
    impaired = ImpairedLink(la, seed=5, loss=0.03, duplicate=0.01, reorder=0.05, delay=0.001)
    a = AsyncStack(Stack(["10.0.0.1"], rng=random.Random(1)), impaired)
    b = AsyncStack(Stack(["10.0.0.2"], rng=random.Random(2)), lb)
    try:
        await b.start_server(sha_server, 80)
        data = random.Random(6).randbytes(1_000_000)
        reader, writer = await a.open_connection("10.0.0.2", 80, timeout=10)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 40) == hashlib.sha256(data).digest()
        writer.close()
        assert impaired.stats["dropped"] > 0
    finally:
        a.close()
        b.close()


async def test_close_flushes_everything_still_buffered(
    pair: tuple[AsyncStack, AsyncStack, MemoryLink, MemoryLink],
) -> None:
    """close() right after a write larger than every buffer still delivers it all."""
    a, b, _, _ = pair
    await b.start_server(sha_server, 83)
    reader, writer = await a.open_connection("10.0.0.2", 83, timeout=5)
    data = random.Random(8).randbytes(9_000_000)  # > 4 MiB send buffer + 64 KiB high water
    writer.write(data)
    writer.close()  # no drain: the transport must flush before it reports closed
    await writer.wait_closed()
    # Our side no longer reads (close), so check the server's view via a second connection.
    assert len(a.stack._conns) == 1
    conn = next(iter(a.stack._conns.values()))
    await asyncio.wait_for(_until(lambda: conn.bytes_in_send_buffer == 0), 20)
    assert conn._snd_una == len(data) + 2  # every byte and our FIN acknowledged
    del reader


async def _until(condition: object) -> None:
    assert callable(condition)
    while not condition():
        await asyncio.sleep(0.01)
