"""Both ends of the replica system test (``test_replicas_netns.py``), run in namespaces.

python -m tests.gateway_core.replicaclient serve NAME HTTP_PORT TCP_PORT
    the app next to one agent, on 127.0.0.1: HTTP answers ``replica NAME`` (200) to
    any method (a request body is read and dropped); TCP writes ``NAME`` and a newline
    on every connection, then closes.  SIGUSR1 toggles "sick": every HTTP answer is
    then 503 ``replica NAME sick`` (the agent's health check fails, requests are still
    answered, so only the health path can take the replica out of the rotation).
python -m tests.gateway_core.replicaclient load TARGETS DOMAIN SECONDS MAX STOPFILE [post]
    HTTP load from one worker per gateway (TARGETS: HOST:PORT,HOST:PORT,...): GETs, and
    with ``post`` every other request a POST with a body; one JSON line per request
    (wall-clock start/end, gateway, method, status, replica or error), flushed as it
    ends; stops after SECONDS, MAX requests in all, or once STOPFILE exists.
python -m tests.gateway_core.replicaclient tcpload TARGETS SECONDS MAX STOPFILE
    the same for a raw TCP tunnel: a new connection every 20 ms per gateway (not
    waiting for the earlier ones), one line each with the replica it reached.
python -m tests.gateway_core.replicaclient probe TARGETS DOMAIN COUNT
    COUNT GETs through each gateway; one JSON line {gateway: {replica: n}}.
python -m tests.gateway_core.replicaclient tcpprobe TARGETS COUNT
    COUNT connections through each gateway; the same line.
python -m tests.gateway_core.replicaclient sticky TARGETS DOMAIN COUNT [COOKIE]
    With COOKIE (a ``kkm_replica`` value) or the one the first answer sets: COUNT GETs
    carrying it, alternating the gateways; one JSON line with the cookie and the
    replicas that answered, in order.

The HTTP client never keeps cookies on its own: only ``sticky`` sends one, by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import os
import signal
import sys
import time
from typing import Any

import httpx

REQUEST_TIMEOUT = 10.0
PAUSE = 0.02  # between one worker's requests: a steady, bounded load


def _targets(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        host, _, port = item.rpartition(":")
        out.append((host, int(port)))
    return out


def _client() -> httpx.AsyncClient:
    no_cookies = http.cookiejar.CookieJar(
        policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
    )
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT, cookies=no_cookies)


def _replica_of(body: str) -> str | None:
    parts = body.split()
    return parts[1] if len(parts) >= 2 and parts[0] == "replica" else None


# -- the app ------------------------------------------------------------------------


async def serve(name: str, http_port: int, tcp_port: int) -> None:
    sick = False

    def toggle() -> None:
        nonlocal sick
        sick = not sick

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, toggle)

    async def http_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = head.decode("latin-1").lower().split("\r\n")
                length = 0
                close = False
                for field in fields[1:]:
                    key, _, value = field.partition(":")
                    if key.strip() == "content-length":
                        length = int(value)
                    elif key.strip() == "connection" and "close" in value:
                        close = True
                if length:
                    await reader.readexactly(length)
                status, body = (
                    (b"503 Service Unavailable", f"replica {name} sick\n")
                    if sick
                    else (b"200 OK", f"replica {name}\n")
                )
                data = body.encode()
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain\r\n"
                    b"content-length: "
                    + str(len(data)).encode()
                    + b"\r\n"
                    + (b"connection: close\r\n" if close else b"")
                    + b"\r\n"
                    + data
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def tcp_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(f"{name}\n".encode())
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    http_server = await asyncio.start_server(http_session, "127.0.0.1", http_port)
    tcp_server = await asyncio.start_server(tcp_session, "127.0.0.1", tcp_port)
    async with http_server, tcp_server:
        await asyncio.gather(http_server.serve_forever(), tcp_server.serve_forever())


# -- clients --------------------------------------------------------------------------


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class _Budget:
    """The load's bounds: a deadline, a request cap and a stop file."""

    def __init__(self, seconds: float, cap: int, stop_file: str) -> None:
        self.deadline = time.monotonic() + seconds
        self.left = cap
        self.stop_file = stop_file

    def take(self) -> bool:
        if self.left <= 0 or time.monotonic() >= self.deadline:
            return False
        if self.stop_file and os.path.exists(self.stop_file):
            return False
        self.left -= 1
        return True


async def _one_http(
    client: httpx.AsyncClient, gateway: str, domain: str, method: str, cookie: str | None = None
) -> dict[str, Any]:
    headers = {"Host": domain}
    if cookie:
        headers["Cookie"] = f"kkm_replica={cookie}"
    record: dict[str, Any] = {"gw": gateway, "m": method, "t0": time.time()}
    try:
        response = await client.request(
            method,
            f"http://{gateway}/",
            headers=headers,
            content=os.urandom(2048) if method == "POST" else None,
        )
    except httpx.HTTPError as exc:
        record.update(status=0, who=None, error=type(exc).__name__)
    else:
        record.update(
            status=response.status_code,
            who=_replica_of(response.text),
            cookie=response.cookies.get("kkm_replica"),
        )
    record["t1"] = time.time()
    return record


async def load(targets: str, domain: str, seconds: float, cap: int, stop: str, post: bool) -> None:
    budget = _Budget(seconds, cap, stop)

    async def worker(host: str, port: int) -> None:
        gateway = f"{host}:{port}"
        async with _client() as client:
            count = 0
            while budget.take():
                method = "POST" if post and count % 2 else "GET"
                count += 1
                _emit(await _one_http(client, gateway, domain, method))
                await asyncio.sleep(PAUSE)

    await asyncio.gather(*(worker(h, p) for h, p in _targets(targets)))


async def _one_tcp(host: str, port: int) -> dict[str, Any]:
    record: dict[str, Any] = {"gw": f"{host}:{port}", "t0": time.time()}
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
        name = line.decode().strip()
        record.update(who=name or None, error=None if name else "no answer")
    except (OSError, TimeoutError) as exc:
        record.update(who=None, error=type(exc).__name__)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    record["t1"] = time.time()
    return record


async def tcpload(targets: str, seconds: float, cap: int, stop: str) -> None:
    budget = _Budget(seconds, cap, stop)

    async def worker(host: str, port: int) -> None:
        # a new connection every PAUSE whatever the earlier ones do: one that hangs
        # must not hide what the connections opened after it meet
        pending = set()
        while budget.take():
            task = asyncio.ensure_future(_one_tcp(host, port))
            task.add_done_callback(lambda done: _emit(done.result()))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(PAUSE)
        if pending:
            await asyncio.wait(pending)

    await asyncio.gather(*(worker(h, p) for h, p in _targets(targets)))


def _tally(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    seen: dict[str, dict[str, int]] = {}
    for record in records:
        key = record["who"] if record.get("who") else f"error:{record.get('error')}"
        if record.get("status", 200) != 200:
            key = f"{key}:{record['status']}"
        per = seen.setdefault(record["gw"], {})
        per[key] = per.get(key, 0) + 1
    return seen


async def probe(targets: str, domain: str, count: int) -> dict[str, Any]:
    records = []
    async with _client() as client:
        for host, port in _targets(targets):
            for _ in range(count):
                records.append(await _one_http(client, f"{host}:{port}", domain, "GET"))
    return _tally(records)


async def tcpprobe(targets: str, count: int) -> dict[str, Any]:
    records = [await _one_tcp(host, port) for host, port in _targets(targets) for _ in range(count)]
    return _tally(records)


async def sticky(targets: str, domain: str, count: int, cookie: str | None) -> dict[str, Any]:
    gateways = [f"{h}:{p}" for h, p in _targets(targets)]
    answers = []
    async with _client() as client:
        if cookie is None:
            first = await _one_http(client, gateways[0], domain, "GET")
            cookie = first.get("cookie")
            answers.append(first.get("who"))
            if cookie is None:
                return {"cookie": None, "who": answers}
        for i in range(count):
            answer = await _one_http(client, gateways[i % len(gateways)], domain, "GET", cookie)
            answers.append(answer["who"] if answer["status"] == 200 else answer["status"])
    return {"cookie": cookie, "who": answers}


def main(argv: list[str]) -> int:
    verb, *args = argv
    if verb == "serve":
        asyncio.run(serve(args[0], int(args[1]), int(args[2])))
    elif verb == "load":
        post = args[5:] == ["post"]
        asyncio.run(load(args[0], args[1], float(args[2]), int(args[3]), args[4], post))
    elif verb == "tcpload":
        asyncio.run(tcpload(args[0], float(args[1]), int(args[2]), args[3]))
    else:
        runners = {
            "probe": lambda: probe(args[0], args[1], int(args[2])),
            "tcpprobe": lambda: tcpprobe(args[0], int(args[1])),
            "sticky": lambda: sticky(
                args[0], args[1], int(args[2]), args[3] if len(args) > 3 else None
            ),
        }
        print(json.dumps(asyncio.run(runners[verb]())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
