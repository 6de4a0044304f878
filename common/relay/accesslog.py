"""The access log: one line per HTTP request and per raw TCP connection or UDP flow.

Theory of operation
-------------------
Each line says when (UTC, RFC 3339 with milliseconds), who (the client address the
gateway trusts: the TCP peer, or behind a configured trusted proxy the address it
names), what (protocol, tunnel, host, method, the path without its query string -
query strings often carry tokens - or the public port), how it ended (status, bytes
in and out, duration), where it went (the upstream) and what the access policy
decided (``decision``: ``allow`` or why not, e.g. ``deny_ip``, ``bad_password``,
``rate_limited``) for whom (``user``).  Lines are JSON objects or logfmt
(``key=value``, values quoted and escaped when needed), so fail2ban and CrowdSec can
read them (``deploy/fail2ban``, ``deploy/crowdsec``).  Nothing a client sends can
break a line: JSON escapes it, logfmt quotes it and writes control characters as
``\\xNN``.

Lines are buffered and written at most every ``flush_interval`` seconds (or when 64
KiB are waiting), to a file or to standard output (``-``).  A file is rotated when it
grows past ``max_bytes`` (``access.log`` → ``access.log.1`` …, ``backups`` kept), and
reopened when something else moved it (logrotate), so either way works.  A write
that fails (disk full) is counted and reported once a minute; serving goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

__all__ = ["AccessLog", "AccessLogSettings", "logfmt"]

log = logging.getLogger(__name__)

FORMATS = ("json", "logfmt")
_FLUSH_BYTES = 64 * 1024
_MAX_FIELD = 2048


@dataclass(frozen=True, slots=True)
class AccessLogSettings:
    """Where and how the access log is written (``path`` None: off; ``-``: stdout)."""

    path: str | None = None
    format: str = "logfmt"
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 5
    flush_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"access log format must be one of {FORMATS}")
        if self.max_bytes < 4096:
            raise ValueError("access log max_bytes must be >= 4096")
        if not 0 <= self.backups <= 1000:
            raise ValueError("access log backups must be in 0..1000")
        if not self.flush_interval > 0:
            raise ValueError("access log flush_interval must be > 0 seconds")

    @property
    def enabled(self) -> bool:
        return bool(self.path)


def _timestamp(now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _logfmt_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)[:_MAX_FIELD]
    if text and all(33 <= ord(c) < 127 and c not in '"=\\' for c in text):
        return text
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif 32 <= ord(c) < 127:
            out.append(c)
        elif ord(c) < 256:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c.encode("utf-8", "replace").decode("ascii", "backslashreplace"))
    return '"' + "".join(out) + '"'


def logfmt(record: dict[str, object]) -> str:
    """One logfmt line (without its newline)."""
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in record.items())


class AccessLog:
    """Buffered, rotated access-log lines (see the module docstring)."""

    def __init__(
        self, settings: AccessLogSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._lines: list[str] = []
        self._pending = 0
        self._last_flush = clock()
        self._file: IO[str] | None = None
        self._inode: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.failed_writes = 0
        self._last_failure_log = 0.0

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    # -- records --------------------------------------------------------------------

    def http(
        self,
        *,
        client: str,
        tunnel: str,
        host: str,
        method: str,
        path: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float | None,
        upstream: str,
        decision: str,
        user: str = "",
    ) -> None:
        self.write(
            {
                "protocol": "http",
                "client": client,
                "tunnel": tunnel or "-",
                "host": host or "-",
                "method": method or "-",
                "path": path or "-",
                "status": status,
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "duration_ms": round(duration * 1000, 3) if duration is not None else -1,
                "upstream": upstream or "-",
                "decision": decision,
                "user": user or "-",
            }
        )

    def flow(
        self,
        *,
        protocol: str,
        client: str,
        tunnel: str,
        port: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        upstream: str,
        decision: str,
    ) -> None:
        self.write(
            {
                "protocol": protocol,
                "client": client,
                "tunnel": tunnel or "-",
                "port": port,
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "duration_ms": round(duration * 1000, 3),
                "upstream": upstream or "-",
                "decision": decision,
            }
        )

    def write(self, fields: dict[str, Any]) -> None:
        """Queue one line (``time`` first); flushed when due."""
        if not self.settings.enabled:
            return
        now = self._clock()
        record: dict[str, object] = {"time": _timestamp(now), **fields}
        if self.settings.format == "json":
            line = json.dumps(record, separators=(",", ":"), ensure_ascii=True)
        else:
            line = logfmt(record)
        self._lines.append(line)
        self._pending += len(line) + 1
        if self._pending >= _FLUSH_BYTES or now - self._last_flush >= self.settings.flush_interval:
            self.flush()

    # -- output ---------------------------------------------------------------------

    def _open(self) -> IO[str]:
        path = self.settings.path
        assert path
        if path == "-":
            return sys.stdout
        handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        stat = os.fstat(handle.fileno())
        self._inode = (stat.st_dev, stat.st_ino)
        return handle

    def _moved(self) -> bool:
        path = self.settings.path
        if path in (None, "-") or self._inode is None:
            return False
        try:
            stat = os.stat(path)
        except OSError:
            return True
        return (stat.st_dev, stat.st_ino) != self._inode

    def _rotate(self) -> None:
        path = self.settings.path
        assert path and path != "-"
        if self._file is not None:
            self._file.close()
            self._file = None
        backups = self.settings.backups
        if backups == 0:
            with contextlib.suppress(OSError):
                os.remove(path)
            return
        for n in range(backups - 1, 0, -1):
            with contextlib.suppress(OSError):
                os.replace(f"{path}.{n}", f"{path}.{n + 1}")
        with contextlib.suppress(OSError):
            os.replace(path, f"{path}.1")

    def flush(self) -> None:
        self._last_flush = self._clock()
        if not self._lines:
            return
        data = "\n".join(self._lines) + "\n"
        self._lines.clear()
        self._pending = 0
        try:
            if self._file is not None and self._moved():
                self._file.close()
                self._file = None
            if self._file is None:
                self._file = self._open()
            self._file.write(data)
            self._file.flush()
            if self.settings.path != "-" and self._file.tell() >= self.settings.max_bytes:
                self._rotate()
        except OSError as exc:
            self.failed_writes += 1
            now = self._clock()
            if now - self._last_failure_log >= 60:
                self._last_failure_log = now
                log.error(
                    "access log write failed",
                    extra={"error": str(exc), "failed_writes": self.failed_writes},
                )
            with contextlib.suppress(OSError):
                if self._file is not None and self._file is not sys.stdout:
                    self._file.close()
            self._file = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Flush on a timer too, so the last lines appear when traffic stops."""
        if self.settings.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flusher())

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.shutdown()

    def shutdown(self) -> None:
        """Write what is buffered and close the file (no timer is stopped: ``close``)."""
        self.flush()
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None
