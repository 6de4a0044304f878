"""Harness for the hub benchmarks: a real Control process and a swarm of clients.

The swarm runs its own event loop in a thread so pytest-benchmark can time plain
functions; every client has a reader task that records what arrived and when.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
from websockets.asyncio.client import ClientConnection, connect

from tests.support import free_port

T = TypeVar("T")
TOKEN = "bench-admin-token-0123456789"


def raise_fd_limit() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


#: ``--max-unauthenticated-per-address`` of the bench's Control (above any swarm size)
UNAUTHENTICATED_CAP = 1_000_000


class ControlProcess:
    """``kakuremichi control`` as a subprocess on loopback."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "control.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kakuremichi.cli",
                "control",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(data_dir),
                "--admin-token",
                TOKEN,
                "--log-level",
                "warning",
                # every swarm client connects from 127.0.0.1, thousands at once: the cap
                # on unauthenticated connections per address is for real hosts
                "--max-unauthenticated-per-address",
                str(UNAUTHENTICATED_CAP),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            # A log file, not a pipe: an unread pipe fills up and blocks the server.
            stderr=log_file,
        )
        log_file.close()  # the child holds its own descriptor
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"control exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise TimeoutError("control did not start")

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


class Watch:
    """Arrival times of one tunnel (by domain) across receivers; event when all have it."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.times: list[float] = []
        self.done = asyncio.Event()

    def arrived(self, when: float) -> None:
        self.times.append(when)
        if len(self.times) >= self.expected:
            self.done.set()


class Client:
    """One authenticated connection and what it received."""

    def __init__(self, ws: ClientConnection, watches: dict[str, Watch]) -> None:
        self.ws = ws
        self.watches = watches
        self.version = 0
        self.arrivals: dict[str, float] = {}
        self.configs = 0
        self.closed = False
        self.config_event = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        try:
            async for raw in self.ws:
                now = time.perf_counter()
                frame = json.loads(raw)
                self.version = frame.get("configVersion", self.version)
                if frame["type"] == "tunnel_create":
                    self.arrivals[frame["data"]["id"]] = now
                    watch = self.watches.get(frame["data"]["domain"])
                    if watch is not None:
                        watch.arrived(now)
                elif frame["type"] == "config":
                    self.configs += 1
                    self.config_event.set()
        except Exception:
            pass
        finally:
            self.closed = True


class Swarm:
    """Many clients on a private event loop."""

    def __init__(self, control: ControlProcess) -> None:
        self.control = control
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.clients: list[Client] = []
        self.watches: dict[str, Watch] = {}
        # Like real clients, every connection heart-beats (every 20 s, spread out).
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._heartbeat_forever()))
        self.http = self.run(self._http())

    async def _http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.control.url,
            timeout=120,
            headers={"Authorization": f"Bearer {TOKEN}"},
            limits=httpx.Limits(max_connections=32),
        )

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 1800) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def create(self, kind: str, count: int, prefix: str) -> list[str]:
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> str:
            async with sem:
                r = await self.http.post(f"/api/{kind}s", json={"name": f"{prefix}{i}"})
                r.raise_for_status()
                return str(r.json()["apiKey"])

        return list(await asyncio.gather(*(one(i) for i in range(count))))

    async def connect_all(self, keys: list[str], kind: str, concurrency: int = 64) -> float:
        sem = asyncio.Semaphore(concurrency)
        ws_url = self.control.url.replace("http", "ws") + "/ws"

        async def one(i: int, key: str) -> None:
            async with sem:
                ws = await connect(ws_url, max_size=None, open_timeout=120, ping_interval=None)
                data: dict[str, Any] = {
                    "apiKey": key,
                    "clientType": kind,
                    "version": "bench",
                    "publicKey": base64.b64encode(i.to_bytes(32, "big")).decode(),
                }
                if kind == "gateway":
                    data |= {"publicIp": "192.0.2.1", "wireguardPort": 51820}
                await ws.send(json.dumps({"type": "auth", "data": data}))
                client = Client(ws, self.watches)
                client.reader = asyncio.get_running_loop().create_task(client.read())
                await asyncio.wait_for(client.config_event.wait(), 120)
                self.clients.append(client)

        started = time.perf_counter()
        before = len(self.clients)

        async def progress() -> None:
            while True:
                await asyncio.sleep(10)
                done = len(self.clients) - before
                print(
                    f"  connected {done}/{len(keys)} after {time.perf_counter() - started:.0f}s",
                    flush=True,
                )

        reporter = asyncio.get_running_loop().create_task(progress())
        try:
            await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
        finally:
            reporter.cancel()
        return time.perf_counter() - started

    async def _heartbeat_forever(self, period: float = 20.0) -> None:
        self._heartbeat_task = asyncio.current_task()
        while True:
            clients = list(self.clients)
            pause = period / max(1, len(clients))
            for client in clients:
                if not client.closed:
                    with contextlib.suppress(Exception):
                        await client.ws.send(
                            json.dumps(
                                {
                                    "type": "heartbeat",
                                    "data": {
                                        "timestamp": time.time(),
                                        "configVersion": client.version,
                                    },
                                }
                            )
                        )
                await asyncio.sleep(pause)
            if not clients:
                await asyncio.sleep(period)

    async def heartbeat_sweep(self, stale: bool) -> float:
        """Every client heart-beats; with ``stale`` each must get a config back."""
        started = time.perf_counter()
        for client in self.clients:
            client.config_event.clear()
        await asyncio.gather(
            *(
                c.ws.send(
                    json.dumps(
                        {
                            "type": "heartbeat",
                            "data": {
                                "timestamp": time.time(),
                                "configVersion": c.version - (1 if stale else 0),
                            },
                        }
                    )
                )
                for c in self.clients
            )
        )
        if stale:
            await asyncio.wait_for(
                asyncio.gather(*(c.config_event.wait() for c in self.clients)), 600
            )
        return time.perf_counter() - started

    async def push_round(self, agent: str, index: int, receivers: int) -> tuple[float, list[float]]:
        """Create a tunnel; return (time until every receiver had it, each arrival)."""
        domain = f"t{index}-{os.getpid()}.bench.example.com"
        watch = self.watches[domain] = Watch(receivers)
        started = time.perf_counter()
        r = await self.http.post(
            "/api/tunnels", json={"domain": domain, "target": "127.0.0.1:8080", "agent": agent}
        )
        r.raise_for_status()
        await asyncio.wait_for(watch.done.wait(), 60)
        del self.watches[domain]
        arrivals = [t - started for t in watch.times]
        return max(arrivals), arrivals

    async def _close(self) -> None:
        task = getattr(self, "_heartbeat_task", None)
        if task is not None:
            task.cancel()
        await asyncio.gather(*(c.ws.close() for c in self.clients), return_exceptions=True)
        await self.http.aclose()

    def close(self) -> None:
        try:
            self.run(self._close(), 120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
