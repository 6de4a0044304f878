"""Running a long-lived program (gateway, agent) until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
from typing import Protocol

from common.logs import kv


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


def raise_open_file_limit(wanted: int | None, name: str) -> int:
    """Raise this process's soft open-file limit to ``wanted`` (None: to the hard limit),
    never above the hard limit; returns the soft limit now in force.

    A server holding many connections needs a descriptor for each: the common default
    soft limit of 1024 would turn a connection past it into an accept error.  A hard
    limit below ``wanted`` is logged once as a warning naming both numbers.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None or hard == resource.RLIM_INFINITY else min(wanted, hard)
    if wanted is not None and hard != resource.RLIM_INFINITY and hard < wanted:
        logging.getLogger(name).warning(
            "the open-file limit is lower than the connections allowed",
            extra=kv(hard_limit=hard, wanted=wanted),
        )
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logging.getLogger(name).warning(
                "could not raise the open-file limit", extra=kv(error=str(exc))
            )
    return soft
