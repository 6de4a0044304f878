"""Harness for the hub benchmarks: real Control processes and a swarm of clients.

The swarm runs its own event loop in a thread so pytest-benchmark can time plain
functions; every client has a reader task that records what arrived and when.

Clients reconnect as ``common.controlclient`` does: a busy Control's refusal (HTTP
503 with ``Retry-After: N``, or a close with ``CLOSE_TRY_AGAIN`` (1013) and ``retry
after N``) waits N to N + max(1, N/4) seconds and counts as a refusal, not a failure;
a failed connection (refused, reset) backs off exponentially with jitter.
Unlike the real client they do not pause a second before their first attempt: a
reconnect round measures Control taking a crowd that arrives at once.  They speak
WebSocket through ``bench.leanws``, not the ``websockets`` library the real client
uses: the swarm shares the two cores with Control, and a lean client leaves them to
Control (its docstring has the numbers).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from bench.leanws import LeanWebSocket, Refused, connect
from common import protocol as p
from control.ws.intake import relax_gc
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
    """``kakuremichi control`` as a subprocess on loopback (SQLite in ``data_dir``, or
    ``database_url``; a replica of others on the same PostgreSQL database)."""

    def __init__(self, data_dir: Path, *extra: str, database_url: str | None = None) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.database_url = database_url
        self.start()

    def start(self) -> None:
        """Start, and return once ``/healthz`` answers; again after :meth:`kill` or
        :meth:`stop` it is a restart on the same port (the URL clients know)."""
        data_dir, extra = self.data_dir, self.extra
        if self.database_url:
            extra = (*extra, "--database-url", self.database_url)
        self.port = getattr(self, "port", None) or free_port()
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
                "--max-pre-request-per-address",
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

    def log_tail(self, lines: int = 30) -> str:
        """The end of what this Control logged (warnings and errors, in every run)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"

    def kill(self) -> None:
        """``kill -9``: no goodbye to anybody."""
        self.proc.kill()
        self.proc.wait()

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

    def __init__(
        self, ws: LeanWebSocket, watches: dict[str, Watch], identity: Identity, url: str
    ) -> None:
        self.ws = ws
        self.watches = watches
        self.identity = identity
        #: the Control (``ws://.../ws``) it is connected to
        self.url = url
        self.version = 0
        self.arrivals: dict[str, float] = {}
        self.configs = 0
        self.closed = False
        self.config_event = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        #: what ended the reader other than a close (a frame it could not read)
        self.error: str | None = None

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
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.closed = True

    async def abort(self) -> None:
        """Drop the connection at once (no close handshake) and let the reader end."""
        self.ws.transport.abort()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)

    def ended(self) -> str:
        """How this connection ended, for a report."""
        if self.error is not None:
            return f"reader failed ({self.error})"
        if self.ws.error is not None:
            return f"protocol error ({self.ws.error})"
        if self.ws.close_code is None:
            return "no config and no close in time"
        return f"closed {self.ws.close_code} {self.ws.close_reason}".strip()


@dataclass(frozen=True)
class Identity:
    """Who a swarm client is: the same key and WireGuard key on every connection."""

    index: int
    key: str
    kind: str


#: a failed connection's back-off, as ``ControlClientSettings`` (seconds)
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0
#: connection attempts one client makes before the round fails
MAX_ATTEMPTS = 30
#: closes that mean the key is no good: a real client keeps retrying, a benchmark stops
FATAL_CLOSES = frozenset({p.CLOSE_AUTH_FAILED, p.CLOSE_REVOKED, p.CLOSE_DISABLED})


class Swarm:
    """Many clients on a private event loop."""

    def __init__(self, control: ControlProcess) -> None:
        self.control = control
        # The swarm's own pauses must not be timed as Control's: its thousands of
        # connections make CPython's default collector walk them all every few
        # hundred allocations (Control relaxes its collector the same way)
        relax_gc()
        # uvloop when installed, as Control runs: the swarm shares the machine with
        # Control, and every CPU second it saves is one Control can use
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.clients: list[Client] = []
        self.watches: dict[str, Watch] = {}
        #: connections Control told to come back later (503 + Retry-After, or 1013)
        self.refusals = 0
        #: connection attempts that failed (backed off and tried again, as
        #: ``common.controlclient`` does): before the WebSocket opened, or ended by
        #: Control before the config came for a reason other than "busy"
        self.failures = 0
        #: how those attempts failed, and how often (reported by the benchmarks)
        self.failure_reasons: Counter[str] = Counter()
        self._indices = itertools.count()  # every client its own WireGuard key
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

    async def connect_all(
        self,
        keys: list[str],
        kind: str,
        concurrency: int | None = 64,
        urls: list[str] | None = None,
    ) -> float:
        """Connect one client per key (key i to ``urls[i % len(urls)]``, default this
        swarm's Control), at most ``concurrency`` handshakes at once (None: no bound, a
        crowd of independent programs).  Returns the seconds until every client had its
        config."""
        identities = [Identity(next(self._indices), key, kind) for key in keys]
        ws_urls = [websocket_url(u) for u in (urls or [self.control.url])]
        return await self._connect_many(
            [(who, ws_urls[i % len(ws_urls)]) for i, who in enumerate(identities)], concurrency
        )

    async def reconnect_lost(self, url: str, concurrency: int | None = None) -> float:
        """Every client whose connection ended connects again, to ``url``; returns the
        seconds until every one of them had its config again."""
        lost = [c for c in self.clients if c.closed]
        self.clients = [c for c in self.clients if not c.closed]
        return await self._connect_many(
            [(c.identity, websocket_url(url)) for c in lost], concurrency
        )

    async def move(self, source: str, share: int, url: str) -> None:
        """Close every ``share``-th client connected to ``source`` and connect it to
        ``url`` instead (putting clients back on a restarted replica)."""
        source = websocket_url(source)
        leaving = [c for c in self.clients if c.url == source][::share]
        await asyncio.gather(*(c.ws.close() for c in leaving))
        self.clients = [c for c in self.clients if c not in leaving]
        await self._connect_many([(c.identity, websocket_url(url)) for c in leaving], 64)

    async def wait_lost(self, url: str, timeout: float = 60) -> int:
        """Until every client connected to ``url`` has seen its connection end (its
        Control died); returns how many that were."""
        url = websocket_url(url)
        on_it = [c for c in self.clients if c.url == url]
        async with asyncio.timeout(timeout):
            while not all(c.closed for c in on_it):
                await asyncio.sleep(0.01)
        return len(on_it)

    async def _connect_many(
        self, who: list[tuple[Identity, str]], concurrency: int | None
    ) -> float:
        sem = asyncio.Semaphore(concurrency or len(who) or 1)
        rng = random.Random(len(who))

        async def one(identity: Identity, url: str) -> None:
            failures: list[str] = []

            async def back_off(reason: str) -> None:
                self.failures += 1
                self.failure_reasons[reason] += 1
                failures.append(reason)
                ceiling = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(len(failures), 16))
                await asyncio.sleep(rng.uniform(BACKOFF_MIN, ceiling))

            for _attempt in range(MAX_ATTEMPTS):
                try:
                    async with sem:
                        client = await self._connect(url, identity)
                except (OSError, TimeoutError, Refused) as exc:
                    retry = retry_after_header(exc)
                    if retry is not None:  # busy: HTTP 503 + Retry-After
                        self.refusals += 1
                        await asyncio.sleep(retry_wait(rng, retry))
                        continue
                    await back_off(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                if client.config_event.is_set():
                    self.clients.append(client)
                    return
                code, reason, ended = client.ws.close_code, client.ws.close_reason, client.ended()
                await client.abort()
                if code in FATAL_CLOSES:
                    raise RuntimeError(f"client {identity.index} refused: {ended}")
                if code == p.CLOSE_TRY_AGAIN and client.error is None:
                    self.refusals += 1
                    await asyncio.sleep(retry_wait(rng, p.parse_retry_after(reason) or 1))
                    continue
                await back_off(ended)
            raise RuntimeError(
                f"client {identity.index}: no config after {MAX_ATTEMPTS} tries: "
                + "; ".join(dict.fromkeys(failures))
            )

        started = time.perf_counter()
        before = len(self.clients)

        async def progress() -> None:
            while True:
                await asyncio.sleep(10)
                done = len(self.clients) - before
                print(
                    f"  connected {done}/{len(who)} after {time.perf_counter() - started:.0f}s",
                    flush=True,
                )

        loop = asyncio.get_running_loop()
        reporter = loop.create_task(progress())
        tasks = [loop.create_task(one(identity, url)) for identity, url in who]
        try:
            await asyncio.gather(*tasks)
        finally:
            reporter.cancel()
            # one failed: the others stop too (their connections closed), rather than
            # run on in a loop about to be stopped
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return time.perf_counter() - started

    async def _connect(self, ws_url: str, identity: Identity) -> Client:
        """One connection and its ``auth``; returns once it has its config or closed."""
        ws = await connect(ws_url, timeout=120)
        data: dict[str, Any] = {
            "apiKey": identity.key,
            "clientType": identity.kind,
            "version": "bench",
            "publicKey": base64.b64encode(identity.index.to_bytes(32, "big")).decode(),
        }
        if identity.kind == "gateway":
            data |= {"publicIp": "192.0.2.1", "wireguardPort": 51820}
        client = Client(ws, self.watches, identity, ws_url)
        reader = client.reader = asyncio.get_running_loop().create_task(client.read())
        configured = asyncio.get_running_loop().create_task(client.config_event.wait())
        try:
            with contextlib.suppress(Exception):  # closed already: the reader says why
                await ws.send(json.dumps({"type": "auth", "data": data}))
            await asyncio.wait(
                {reader, configured}, timeout=120, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # cancelled: no connection left behind
            await client.abort()
            raise
        finally:
            configured.cancel()
        return client

    async def _heartbeat_forever(self, period: float = 20.0, slices: int = 20) -> None:
        """Every client heart-beats once per ``period``, spread over it in ``slices``
        paced by the clock: a loop busy with a reconnect storm sends late slices at once
        rather than stretching the period past Control's offline timeout (60 s)."""
        self._heartbeat_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            clients = list(self.clients)
            for k in range(slices):
                for client in clients[k::slices]:
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
                await asyncio.sleep(max(0.0, started + (k + 1) * period / slices - loop.time()))

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


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def websocket_url(url: str) -> str:
    """Control's hub URL for its base URL (as it is, when it is one already)."""
    return url if url.startswith("ws") else url.replace("http", "ws", 1) + "/ws"


def retry_wait(rng: random.Random, seconds: int) -> float:
    """``ControlClient.retry_wait``: N plus a quarter of N (at least a second)."""
    return rng.uniform(seconds, seconds + max(1.0, seconds / 4))


def retry_after_header(exc: BaseException) -> int | None:
    """The wait an HTTP 429/503 refusal of the upgrade asked for, if any."""
    if not isinstance(exc, Refused) or exc.status not in (429, 503):
        return None
    header = exc.headers.get("retry-after", "")
    return p.parse_retry_after(f"retry after {header[:6]}") if header.isdigit() else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
