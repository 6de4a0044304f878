"""Background tasks that never end silently: each one is watched and restarted.

Theory of operation
-------------------
A program's long-lived tasks (the Control client, the reconcile loop, health checks,
statistics, ACME, the WireGuard watch …) are meant to run until the program stops.
:meth:`Supervisor.start` runs one under a keeper task.  When the task returns or
raises while the program is not stopping, that is a fault: it is logged at error
level with the task's name and the error (the traceback when it raised), and the
task is started again after an exponential back-off (``backoff_min`` doubling up to
``backoff_max``: 1 s → 60 s), reset once a run has lasted ``stable_after`` seconds.
A ``CancelledError`` that comes out of the task without anyone cancelling the keeper
(a cancellation leaking from inside) counts as a fault too.

While a task waits to restart, and until its new run has lasted ``stable_after``, the
``tasks`` part of the program's :class:`~common.health.Health` is degraded and names
it.  :meth:`Supervisor.stop` cancels every keeper (cancellation at stop is not an
error) and waits for them, at most ``stop_timeout`` seconds (a task that ignores its
cancellation is logged by name, not waited for forever).

The clock and the sleep of the back-off are parameters, so tests run the policy on a
fake clock without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from common.health import DEGRADED, OK, Health, PartHealth
from common.logs import kv

log = logging.getLogger("kakuremichi.supervisor")

Sleep = Callable[[float], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off: ``first`` doubling per consecutive failure up to ``most``."""

    first: float = 1.0
    most: float = 60.0

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th consecutive failure (1, 2, …)."""
        return min(self.most, self.first * 2.0 ** min(max(failures - 1, 0), 32))


@dataclass
class _Kept:
    name: str
    run: Callable[[], Awaitable[object]]
    keeper: asyncio.Task[None] | None = None
    restarts: int = 0
    last_error: str = ""
    #: the clock when the current run started (None: waiting to restart)
    running_since: float | None = None
    restart_at: float = 0.0
    failures: int = field(default=0, repr=False)


class Supervisor:
    """Runs named background tasks and restarts them when they end (see the module
    docstring)."""

    def __init__(
        self,
        role: str,
        health: Health | None = None,
        *,
        backoff: Backoff | None = None,
        stable_after: float = 30.0,
        stop_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.role = role
        self.backoff = backoff or Backoff()
        self.stable_after = stable_after
        self.stop_timeout = stop_timeout
        self._clock = clock
        self._sleep = sleep
        self._kept: dict[str, _Kept] = {}
        self._stopping = False
        if health is not None:
            health.probe("tasks", self.health)

    @property
    def names(self) -> list[str]:
        return list(self._kept)

    def start(self, name: str, run: Callable[[], Awaitable[object]]) -> None:
        """Run ``run()`` as the task ``name`` until :meth:`stop`, restarting it when it
        ends.  Names are unique; starting after :meth:`stop` is an error."""
        if self._stopping:
            raise RuntimeError("the supervisor is stopped")
        if name in self._kept:
            raise ValueError(f"a task named {name!r} is already supervised")
        kept = _Kept(name, run)
        kept.keeper = asyncio.get_running_loop().create_task(
            self._keep(kept), name=f"{self.role}:{name}"
        )
        self._kept[name] = kept

    def restarts(self, name: str) -> int:
        """How many times the task ``name`` has been restarted."""
        return self._kept[name].restarts

    def running(self, name: str) -> bool:
        """Whether the task ``name`` is in a run now (not waiting to restart)."""
        kept = self._kept.get(name)
        return kept is not None and kept.running_since is not None

    async def _keep(self, kept: _Kept) -> None:
        while True:
            kept.running_since = started = self._clock()
            exc_info: BaseException | None = None
            try:
                await kept.run()
                error = "returned"
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if self._stopping or (task is not None and task.cancelling()):
                    raise  # we are being cancelled: the program stops
                error, exc_info = "cancelled from inside", exc
            except Exception as exc:
                error, exc_info = f"{type(exc).__name__}: {exc}", exc
            if self._stopping:
                return
            kept.running_since = None
            kept.failures = 1 if self._clock() - started >= self.stable_after else kept.failures + 1
            delay = self.backoff.delay(kept.failures)
            kept.restarts += 1
            kept.last_error = error[:300]
            kept.restart_at = self._clock() + delay
            log.error(
                "background task ended unexpectedly; restarting",
                exc_info=exc_info,
                extra=kv(
                    role=self.role,
                    task=kept.name,
                    error=kept.last_error,
                    restarts=kept.restarts,
                    retry_in_s=delay,
                ),
            )
            await self._sleep(delay)

    def health(self) -> PartHealth:
        """The ``tasks`` part: degraded while a task waits to restart or has not yet
        run ``stable_after`` seconds since its restart."""
        now = self._clock()
        troubled = []
        for kept in self._kept.values():
            if kept.restarts == 0:
                continue
            if kept.running_since is None:
                wait = max(0.0, kept.restart_at - now)
                troubled.append(
                    f"{kept.name} restarting in {wait:.0f}s after {kept.last_error} "
                    f"({kept.restarts} restarts)"
                )
            elif now - kept.running_since < self.stable_after:
                troubled.append(
                    f"{kept.name} restarted {now - kept.running_since:.0f}s ago after "
                    f"{kept.last_error} ({kept.restarts} restarts)"
                )
        if troubled:
            return PartHealth(DEGRADED, "; ".join(troubled))
        return PartHealth(OK, f"{len(self._kept)} running")

    async def stop(self) -> None:
        """Cancel every task and wait for them (bounded by ``stop_timeout``)."""
        self._stopping = True
        keepers = {k.keeper: k.name for k in self._kept.values() if k.keeper is not None}
        for keeper in keepers:
            keeper.cancel()
        if not keepers:
            return
        done, pending = await asyncio.wait(keepers, timeout=self.stop_timeout)
        for keeper in done:
            if not keeper.cancelled() and keeper.exception() is not None:
                log.error(
                    "background task failed while stopping",
                    exc_info=keeper.exception(),
                    extra=kv(role=self.role, task=keepers[keeper]),
                )
        if pending:
            log.error(
                "background tasks did not stop when cancelled",
                extra=kv(
                    role=self.role,
                    tasks=",".join(sorted(keepers[k] for k in pending)),
                    waited_s=self.stop_timeout,
                ),
            )
