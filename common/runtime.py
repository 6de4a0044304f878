"""The control-driven runtime the gateway and the agent share.

Theory of operation
-------------------
Both programs do the same thing around their data plane: keep a Control connection
(:class:`~common.controlclient.ControlClient`), turn every change of Control's view
into one reconcile pass, keep the last configuration applied in the state directory
and serve it after a restart while Control is away, run background tasks that must
not die, and say on ``/healthz`` what is wrong.  :class:`ControlRuntime` does all of
that once; a program gives it only what differs, a ``select`` (``ControlView.agent_config``
or ``gateway_config``) and an async ``apply(config)`` that makes its data plane match.

* **Start.**  The stored configuration (``last-config.json`` in the data directory) is
  loaded into the view, parsed as Control's ``config`` frame is; if there is one, a
  pass applies it at once, so the program serves its tunnels before Control answers.
* **Reconcile.**  Every change of the view sets a flag; one task waits for it, takes a
  snapshot of the view (frames arriving during an ``await`` inside ``apply`` do not
  mix into it) and awaits ``apply(snapshot)``; a burst of changes costs one pass.
  After a pass that succeeded the snapshot is written to the state file (0600,
  atomically: a gateway's holds certificate keys), so the file only ever holds a
  configuration that was applied whole.
* **One failure policy.**  An exception from ``apply`` is logged with the role, what
  was being applied (config version, tunnel count) and the error: one line for the
  program's expected errors (``OSError`` and the like), the traceback for anything
  else.  The pass is retried after an exponential back-off (1 s → 60 s, reset by a
  success; a newer view is applied at the retry), and nothing is torn down: what
  ``apply`` did not change keeps serving and the state file keeps the last good
  configuration.  Every background task, this loop and the Control client included,
  runs under a :class:`~common.supervisor.Supervisor`: one that returns or raises is
  logged with its name and restarted with back-off.
* **Health.**  The runtime's :class:`~common.health.Health` has the parts ``control``
  (connected; or degraded, serving the stored / last configuration, with the
  connection's error; down with no configuration at all), ``config`` (applied, with
  its version; degraded while the last apply failed, with the reason; down before any
  configuration) and ``tasks`` (degraded while a task is restarting); programs add
  their own (the agent's ``wireguard``, the gateway's ``wireguard`` and ``acme``).

Composition, not a base class: the gateway and the agent each *have* a runtime and
hand it two functions, so the shared code has no hooks to override and no half-built
base state during a subclass's ``__init__`` (STYLE.md 15); what differs stays in one
place per program, and a test drives the runtime with a plain function.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, TypeVar

from common import protocol as p
from common.controlclient import ControlClient, ControlClientSettings, ControlView
from common.health import DEGRADED, DOWN, OK, Health, PartHealth
from common.logs import kv
from common.supervisor import Backoff, Sleep, Supervisor

log = logging.getLogger("kakuremichi.runtime")

#: the last configuration applied, in the program's data directory
STATE_FILE = "last-config.json"

ConfigT = TypeVar("ConfigT", p.AgentConfig, p.GatewayConfig)


class ControlRuntime(Generic[ConfigT]):
    """Control connection, reconcile loop, stored configuration, supervised tasks and
    health of one gateway or agent (see the module docstring)."""

    def __init__(
        self,
        client_settings: ControlClientSettings,
        data_dir: Path,
        select: Callable[[ControlView], ConfigT | None],
        apply: Callable[[ConfigT], Awaitable[None]],
        *,
        expected_errors: tuple[type[BaseException], ...] = (OSError,),
        on_change: Callable[[ControlView], None] | None = None,
        backoff: Backoff | None = None,
        stable_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.role = client_settings.client_type
        self.client = ControlClient(client_settings, on_change=self._changed)
        self.state_path = data_dir / STATE_FILE
        self.health = Health()
        self.supervisor = Supervisor(
            self.role,
            self.health,
            backoff=backoff,
            stable_after=stable_after,
            clock=clock,
            sleep=sleep,
        )
        self.backoff = backoff or Backoff()
        self._select: Callable[[ControlView], ConfigT | None] = select
        self._apply: Callable[[ConfigT], Awaitable[None]] = apply
        self._expected = expected_errors
        self._on_change = on_change
        self._sleep = sleep
        self.dirty = asyncio.Event()
        #: reconcile passes that succeeded (tests wait on it)
        self.applied = 0
        #: the configuration applied by the last successful pass, and its version
        self.applied_config: ConfigT | None = None
        self.applied_version = 0
        #: why the last pass failed ("" after a success)
        self.last_error = ""
        self.retry_in = 0.0
        self.health.probe("control", self._control_health)
        self.health.probe("config", self._config_health)

    @property
    def view(self) -> ControlView:
        return self.client.view

    @property
    def source(self) -> str:
        """Where the view's configuration came from: "control", "stored" (the state
        file; Control has sent nothing since the start) or "" (none yet)."""
        if not self.view.has_config:
            return ""
        # a restored view keeps version 0; every frame from Control carries one >= 1
        return "control" if self.view.config_version > 0 else "stored"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Load the stored configuration (applied by the first pass), connect to
        Control and start reconciling; the program adds its own tasks with
        :meth:`supervise`."""
        self.view.restore(self.state_path, self.role)
        self.supervise("control", self.client.run)
        self.supervise("reconcile", self._reconcile_forever)

    def supervise(self, name: str, run: Callable[[], Awaitable[object]]) -> None:
        """Run a background task until :meth:`stop`, restarted whenever it ends."""
        self.supervisor.start(name, run)

    async def stop(self) -> None:
        """Close the Control connection (1001) and cancel and await every task."""
        await self.client.stop()
        await self.supervisor.stop()

    # -- reconciliation -------------------------------------------------------------------

    def _changed(self, view: ControlView) -> None:
        self.dirty.set()
        if self._on_change is not None:
            self._on_change(view)

    def _describe(self, config: ConfigT, version: int) -> dict[str, object]:
        return {
            "role": self.role,
            "source": self.source,
            "config_version": version,
            "tunnels": len(config.tunnels),
            "previous_in_force": self.applied_config is not None,
        }

    async def _reconcile_forever(self) -> None:
        self.dirty.set()  # a (re)started loop looks at the view once: nothing is lost
        failures = 0
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            config, version = self._select(self.view), self.view.config_version
            if config is None:
                continue
            try:
                await self._apply(config)
            except Exception as exc:
                failures += 1
                self.retry_in = self.backoff.delay(failures)
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                expected = isinstance(exc, self._expected)
                log.error(
                    "applying the configuration failed; retrying"
                    if expected
                    else "applying the configuration failed unexpectedly; retrying",
                    exc_info=None if expected else exc,
                    extra=kv(
                        **self._describe(config, version),
                        error=self.last_error,
                        retry_in_s=self.retry_in,
                    ),
                )
                await self._sleep(self.retry_in)
                self.dirty.set()  # the newest view at the retry
                continue
            failures = 0
            self.last_error = ""
            self.applied_config, self.applied_version = config, version
            self.applied += 1
            # served after a restart while Control is away; an OSError is logged there
            self.view.store(self.state_path, config)

    # -- health ---------------------------------------------------------------------------

    def _control_health(self) -> PartHealth:
        if self.view.disabled:
            return PartHealth(
                DOWN, "disabled by an admin in control: every tunnel is served as disabled"
            )
        if self.client.connected.is_set():
            return PartHealth(OK, "connected")
        error = self.client.last_error or "connecting"
        if not self.view.has_config:
            return PartHealth(DOWN, f"not connected ({error}) and no configuration to serve")
        if self.source == "stored":
            return PartHealth(
                DEGRADED, f"not connected ({error}); serving the stored configuration"
            )
        return PartHealth(
            DEGRADED, f"not connected ({error}); serving the last configuration from control"
        )

    def _config_health(self) -> PartHealth:
        if not self.view.has_config:
            return PartHealth(DOWN, "no configuration from control yet")
        if self.last_error:
            kept = (
                "the previous one stays"
                if self.applied_config is not None
                else "nothing applied yet"
            )
            return PartHealth(
                DEGRADED,
                f"last apply failed ({self.last_error}); {kept}; "
                f"retrying within {self.retry_in:g}s",
            )
        if self.applied_config is None:
            return PartHealth(DEGRADED, "not applied yet")
        tunnels = len(self.applied_config.tunnels)
        if self.applied_version == 0:
            return PartHealth(OK, f"applied the stored configuration ({tunnels} tunnels)")
        return PartHealth(
            OK, f"applied control's version {self.applied_version} ({tunnels} tunnels)"
        )
