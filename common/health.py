"""A program's health as named parts, each ok, degraded or down with a reason.

Theory of operation
-------------------
A :class:`Health` holds parts by name (``control``, ``config``, ``tasks``,
``wireguard`` …).  A part is either *set* (the code that knows, e.g. the reconcile
loop after a pass, records a :class:`PartHealth`) or *probed* (a function evaluated
each time the health is read, for state that lives elsewhere: is the Control
connection up, how many gateways answer).  :meth:`Health.report` evaluates them all
into a :class:`HealthReport`: the worst state wins, and the admin listener's
``/healthz`` answers 200 unless some part is down (503), with a JSON body naming
every part's state and reason.  Degraded means "serving, but something needs a
look" (Control away while the stored configuration serves, a failed apply retrying
behind the previous configuration, a task restarting); down means "not serving".

A probe that raises is a bug in the probe, not a state of the program: the part
reads as down with the exception's type, logged with its traceback once a minute.
Reasons are bounded in length and passed through the log redaction (an error
message could quote a key).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from common.logs import OncePer, kv, redact

log = logging.getLogger("kakuremichi.health")

OK = "ok"
DEGRADED = "degraded"
DOWN = "down"
_RANK = {OK: 0, DEGRADED: 1, DOWN: 2}
MAX_REASON = 300


@dataclass(frozen=True, slots=True)
class PartHealth:
    """One part's state (``ok`` / ``degraded`` / ``down``) and why."""

    state: str
    reason: str = ""

    def __post_init__(self) -> None:
        if self.state not in _RANK:
            raise ValueError(f"unknown health state {self.state!r}")


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Every part's health at one moment."""

    parts: dict[str, PartHealth]

    @property
    def state(self) -> str:
        """The worst part's state (``ok`` when there are no parts)."""
        return max((p.state for p in self.parts.values()), key=_RANK.__getitem__, default=OK)

    @property
    def http_status(self) -> int:
        return 503 if self.state == DOWN else 200

    def problems(self) -> dict[str, PartHealth]:
        """The parts that are not ok."""
        return {name: part for name, part in self.parts.items() if part.state != OK}

    def to_json(self) -> bytes:
        body = {
            "status": self.state,
            "parts": {
                name: {"state": part.state, "reason": part.reason}
                for name, part in sorted(self.parts.items())
            },
        }
        return json.dumps(body, indent=1).encode() + b"\n"


Probe = Callable[[], PartHealth]


class Health:
    """Named parts of one program's health (see the module docstring)."""

    def __init__(self) -> None:
        self._parts: dict[str, PartHealth | Probe] = {}
        self._probe_errors = OncePer(60.0)

    def set(self, name: str, state: str, reason: str = "") -> None:
        """Record a part's state now (replaces a probe of that name)."""
        self._parts[name] = PartHealth(state, reason)

    def probe(self, name: str, probe: Probe) -> None:
        """Evaluate ``probe()`` for this part whenever the health is read."""
        self._parts[name] = probe

    def remove(self, name: str) -> None:
        self._parts.pop(name, None)

    def part(self, name: str) -> PartHealth | None:
        """One part's health now (None if there is no such part)."""
        entry = self._parts.get(name)
        return None if entry is None else self._evaluate(name, entry)

    def report(self) -> HealthReport:
        return HealthReport({name: self._evaluate(name, e) for name, e in self._parts.items()})

    def _evaluate(self, name: str, entry: PartHealth | Probe) -> PartHealth:
        if isinstance(entry, PartHealth):
            part = entry
        else:
            try:
                part = entry()
            except Exception as exc:
                due, unlogged = self._probe_errors.due(name)
                if due:
                    log.exception(
                        "health probe failed", extra=kv(part=name, since_last_logged=unlogged)
                    )
                return PartHealth(DOWN, f"health probe raised {type(exc).__name__}")
        reason = redact(part.reason)
        if len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - 1] + "…"
        return part if reason == part.reason else PartHealth(part.state, reason)
