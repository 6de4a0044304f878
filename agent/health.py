"""Health of local targets, reported to Control as ``status``.

Every ``interval`` seconds each enabled tunnel's target is checked concurrently: a TCP
connect for ``host:port`` targets, an HTTP request for URL targets (any status below
500 counts as healthy).  A report goes out when any tunnel's health changed, and at
least every ``report_every`` checks so Control's view does not go stale.  Checks never
raise: a failure is a result (``unhealthy`` with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from common.logs import kv
from common.protocol import TunnelHealth, TunnelSpec, status_wire
from common.relay.targets import Target

log = logging.getLogger("agent.health")

Health = tuple[str, str]  # ("healthy" | "unhealthy" | "unknown", detail)


async def check_target(target: Target, limit: float = 3.0) -> Health:
    """Probe one target; never raises."""
    writer = None
    try:
        context = None
        if target.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # health, not trust: the origin is local
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port, ssl=context), limit
        )
        if not target.http:
            return "healthy", "tcp connect ok"
        path = target.path_prefix or "/"
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {target.host}\r\nConnection: close\r\n"
            "User-Agent: kakuremichi-health\r\n\r\n".encode()
        )
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), limit)
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return "unhealthy", "not an HTTP response"
        status = int(parts[1])
        return ("healthy" if status < 500 else "unhealthy"), f"HTTP {status}"
    except TimeoutError:
        return "unhealthy", f"no answer within {limit:g}s"
    except ConnectionRefusedError:
        return "unhealthy", "connection refused"
    except ssl.SSLError as exc:
        return "unhealthy", f"TLS: {exc.reason or exc}"[:200]
    except OSError as exc:
        return "unhealthy", (exc.strerror or str(exc))[:200]
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class HealthMonitor:
    """Checks the targets of the current tunnels and reports changes."""

    def __init__(
        self,
        tunnels: Callable[[], dict[str, TunnelSpec]],
        report: Callable[[dict[str, Any]], Awaitable[bool]],
        interval: float = 15.0,
        timeout: float = 3.0,
        report_every: int = 4,
    ) -> None:
        self.tunnels = tunnels
        self.report = report
        self.interval = interval
        self.timeout = timeout
        self.report_every = report_every
        self.last: dict[str, Health] = {}

    async def check_all(self) -> dict[str, Health]:
        current = {tid: t for tid, t in self.tunnels().items() if t.enabled}
        results: dict[str, Health] = {}

        async def one(tunnel_id: str, tunnel: TunnelSpec) -> None:
            try:
                target = Target.parse(tunnel.target)
            except ValueError as exc:
                results[tunnel_id] = ("unhealthy", str(exc))
                return
            if tunnel.protocol == "udp":
                results[tunnel_id] = ("unknown", "udp targets are not probed")
                return
            results[tunnel_id] = await check_target(target, self.timeout)

        await asyncio.gather(*(one(tid, t) for tid, t in current.items()))
        return results

    async def run(self) -> None:
        rounds = 0
        while True:
            results = await self.check_all()
            changed = {
                tid: h for tid, h in results.items() if self.last.get(tid, ("", ""))[0] != h[0]
            }
            for tunnel_id, (health, detail) in changed.items():
                log.info(
                    "local target health changed",
                    extra=kv(tunnel=tunnel_id, health=health, detail=detail),
                )
            rounds += 1
            if changed or rounds % self.report_every == 0:
                payload = status_wire(
                    [TunnelHealth(tid, h, d[:512]) for tid, (h, d) in results.items()]
                )
                if await self.report(payload):
                    self.last = results
            await asyncio.sleep(self.interval)
