"""Running a long-lived program (gateway, agent) until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Protocol

from kakuremichi.logs import kv


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_until_signalled(service: Service, name: str) -> int:
    """Start ``service``, wait for SIGTERM/SIGINT, stop it: exit code 0, or 1 when it
    could not start (the reason is logged; a partly started service is stopped)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await service.start()
    except Exception as exc:
        logging.getLogger(name).error(f"{name} failed to start", extra=kv(error=str(exc)))
        await service.stop()
        return 1
    await stop.wait()
    await service.stop()
    return 0
