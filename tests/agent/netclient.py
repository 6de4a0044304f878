"""Client side of the namespace system tests, run inside a namespace; prints one JSON line.

python -m tests.agent.netclient get HOST:PORT DOMAIN PATH
python -m tests.agent.netclient wait HOST:PORT DOMAIN STATUS SECONDS
python -m tests.agent.netclient download HOST:PORT DOMAIN BYTES
python -m tests.agent.netclient upload HOST:PORT DOMAIN BYTES
python -m tests.agent.netclient slowdownload HOST:PORT DOMAIN BYTES SECONDS (read over ~SECONDS)
python -m tests.agent.netclient websocket HOST:PORT DOMAIN
python -m tests.agent.netclient tcp HOST PORT BYTES
python -m tests.agent.netclient udp HOST PORT
python -m tests.agent.netclient burst HOST:PORT DOMAIN COUNT       (status counts)
python -m tests.agent.netclient https HOST:PORT DOMAIN PATH CAFILE (SNI = DOMAIN)
python -m tests.agent.netclient wss HOST:PORT DOMAIN CAFILE
python -m tests.agent.netclient serve TCP_PORT UDP_PORT     (local echo services)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import sys
import time
from typing import Any

import httpx
from websockets.asyncio.client import connect

from kakuremichi.sampleapp import pattern_sha256


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def get(address: str, domain: str, path: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            response = await client.get(f"http://{address}{path}", headers={"Host": domain})
        except httpx.HTTPError as exc:
            return {"status": 0, "error": type(exc).__name__}
        return {"status": response.status_code, "body": response.text[:2000]}


async def wait(address: str, domain: str, status: int, within: float) -> dict[str, Any]:
    """Poll every 50 ms until ``status``; the elapsed time is what the tests check."""
    started = time.monotonic()
    last: Any = None
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() - started < within:
            try:
                last = (
                    await client.get(f"http://{address}/", headers={"Host": domain})
                ).status_code
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if last == status:
                return {"ok": True, "seconds": time.monotonic() - started}
            await asyncio.sleep(0.05)
    return {"ok": False, "last": last, "seconds": time.monotonic() - started}


async def download(address: str, domain: str, size: int) -> dict[str, Any]:
    digest, total = hashlib.sha256(), 0
    started = time.monotonic()
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream(
            "GET", f"http://{address}/bytes/{size}", headers={"Host": domain}
        ) as response,
    ):
        async for chunk in response.aiter_bytes():
            digest.update(chunk)
            total += len(chunk)
    return {
        "status": response.status_code,
        "bytes": total,
        "ok": digest.hexdigest() == pattern_sha256(size),
        "seconds": time.monotonic() - started,
    }


async def slow_download(address: str, domain: str, size: int, seconds: float) -> dict[str, Any]:
    """Read ``size`` bytes over about ``seconds`` (a download that outlasts an event)."""
    digest, total = hashlib.sha256(), 0
    pause = seconds / max(1, size // 65536)
    started = time.monotonic()
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream(
            "GET", f"http://{address}/bytes/{size}", headers={"Host": domain}
        ) as response,
    ):
        async for chunk in response.aiter_bytes(65536):
            digest.update(chunk)
            total += len(chunk)
            await asyncio.sleep(pause)
    return {
        "status": response.status_code,
        "bytes": total,
        "ok": digest.hexdigest() == pattern_sha256(size),
        "seconds": time.monotonic() - started,
    }


async def upload(address: str, domain: str, size: int) -> dict[str, Any]:
    digest = hashlib.sha256()
    block = os.urandom(1 << 16)

    async def body() -> Any:
        left = size
        while left > 0:
            piece = block[: min(left, len(block))]
            digest.update(piece)
            left -= len(piece)
            yield piece

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"http://{address}/digest",
            content=body(),
            headers={"Host": domain, "Content-Length": str(size)},
        )
    answer = response.json()
    return {
        "status": response.status_code,
        "ok": answer == {"bytes": size, "sha256": digest.hexdigest()},
        "seconds": time.monotonic() - started,
    }


async def websocket(address: str, domain: str) -> dict[str, Any]:
    host, port = _split(address)
    async with connect(f"ws://{domain}/ws", host=host, port=port, open_timeout=10) as ws:
        echoes = []
        for message in ("hello", "x" * 70_000):
            await ws.send(message)
            echoes.append(await asyncio.wait_for(ws.recv(), 10) == message)
    return {"ok": all(echoes)}


async def burst(address: str, domain: str, count: int) -> dict[str, Any]:
    """``count`` requests at once; how many got each status, and the Retry-After seen."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:

        async def one() -> httpx.Response:
            return await client.get(f"http://{address}/", headers={"Host": domain})

        answers = await asyncio.gather(*(one() for _ in range(count)))
    statuses: dict[str, int] = {}
    for answer in answers:
        statuses[str(answer.status_code)] = statuses.get(str(answer.status_code), 0) + 1
    retry = [a.headers.get("retry-after") for a in answers if a.status_code == 429]
    return {"statuses": statuses, "retry_after": retry[:1]}


async def https(address: str, domain: str, path: str, cafile: str) -> dict[str, Any]:
    """GET over TLS with SNI ``domain`` trusting ``cafile``; the body is hashed as it
    streams (``/bytes/N`` is checked against the pattern)."""
    host, port = _split(address)
    context = ssl.create_default_context(cafile=cafile)
    started = time.monotonic()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname=domain), 10
    )
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        status = int(head.split(b" ", 2)[1])
        digest, total, first = hashlib.sha256(), 0, b""
        while chunk := await asyncio.wait_for(reader.read(1 << 16), 60):
            digest.update(chunk)
            total += len(chunk)
            first = first or chunk[:200]
    finally:
        writer.close()
    result: dict[str, Any] = {"status": status, "bytes": total, "body": first.decode("latin-1")}
    if path.startswith("/bytes/"):
        result["ok"] = total == int(path[7:]) and digest.hexdigest() == pattern_sha256(total)
    result["seconds"] = time.monotonic() - started
    return result


async def wss(address: str, domain: str, cafile: str) -> dict[str, Any]:
    host, port = _split(address)
    context = ssl.create_default_context(cafile=cafile)
    async with connect(
        f"wss://{domain}/ws", host=host, port=port, ssl=context, open_timeout=10
    ) as ws:
        await ws.send("over tls")
        return {"ok": await asyncio.wait_for(ws.recv(), 10) == "over tls"}


async def tcp(host: str, port: int, size: int) -> dict[str, Any]:
    payload = os.urandom(size)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    writer.write(payload)
    writer.write_eof()  # half-close: the echo still answers everything
    received = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    return {"ok": received == payload, "bytes": len(received)}


async def udp(host: str, port: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            replies.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(host, port))
    try:
        for _ in range(20):
            transport.sendto(b"ping")
            try:
                return {"reply": (await asyncio.wait_for(replies.get(), 0.5)).decode()}
            except TimeoutError:
                continue
        return {"reply": None}
    finally:
        transport.close()


async def serve(tcp_port: int, udp_port: int) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()

    class UdpEcho(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(b"echo:" + data, addr)

    server = await asyncio.start_server(echo, "127.0.0.1", tcp_port)
    await asyncio.get_running_loop().create_datagram_endpoint(
        UdpEcho, local_addr=("127.0.0.1", udp_port)
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    verb, *args = argv
    if verb == "serve":
        asyncio.run(serve(int(args[0]), int(args[1])))
        return 0
    runners = {
        "get": lambda: get(args[0], args[1], args[2]),
        "wait": lambda: wait(args[0], args[1], int(args[2]), float(args[3])),
        "download": lambda: download(args[0], args[1], int(args[2])),
        "upload": lambda: upload(args[0], args[1], int(args[2])),
        "slowdownload": lambda: slow_download(args[0], args[1], int(args[2]), float(args[3])),
        "websocket": lambda: websocket(args[0], args[1]),
        "tcp": lambda: tcp(args[0], int(args[1]), int(args[2])),
        "udp": lambda: udp(args[0], int(args[1])),
        "burst": lambda: burst(args[0], args[1], int(args[2])),
        "https": lambda: https(args[0], args[1], args[2], args[3]),
        "wss": lambda: wss(args[0], args[1], args[2]),
    }
    print(json.dumps(asyncio.run(runners[verb]())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
