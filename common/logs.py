"""Structured logging: one line per event, JSON or logfmt, secrets redacted.

Call sites pass context through ``extra={"fields": {...}}`` (or :func:`kv`); both
formatters render those fields.  A filter scrubs anything that looks like one of our
API keys or a bearer token, so a careless log call cannot leak a secret.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_SECRET = re.compile(r"\b(agt|gtw|adm|kmt|stp|ses)_[A-Za-z0-9_\-]{8,}")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-~+/=]{8,}")


def redact(text: str) -> str:
    text = _SECRET.sub(lambda m: m.group(1) + "_<redacted>", text)
    return _BEARER.sub(lambda m: m.group(1) + "<redacted>", text)


def kv(**fields: Any) -> dict[str, Any]:
    """``log.info("msg", extra=kv(agent="x"))`` — structured fields for a log line."""
    return {"fields": fields}


#: the key :class:`OncePer` counts unseen keys under when its table is full
_OTHER = "(other)"


class OncePer:
    """Log a recurring event once per key (an error code, a frame type, an address) per
    interval; :meth:`due` answers whether to log now and how many of that key went
    unlogged since the last line.  Keys are bounded (``max_keys``): when an unseen key
    finds the table full, keys last logged an interval or more ago are forgotten (with
    any count not logged yet); if none is, unseen keys share one, ``"(other)"``."""

    def __init__(self, interval: float = 60.0, max_keys: int = 64) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def due(self, key: str, now: float | None = None) -> tuple[bool, int]:
        """``(log it now?, occurrences not logged since the last line of this key)``."""
        now = time.monotonic() if now is None else now
        if key not in self._logged_at and self._full():
            self._forget_stale(now)
            if self._full():
                key = _OTHER
        last = self._logged_at.get(key)
        if last is not None and now - last < self.interval:
            self._unlogged[key] = self._unlogged.get(key, 0) + 1
            return False, 0
        # re-inserted, so the table stays ordered by when each key was last logged
        self._logged_at.pop(key, None)
        self._logged_at[key] = now
        return True, self._unlogged.pop(key, 0)

    def _full(self) -> bool:
        return len(self._logged_at) - (_OTHER in self._logged_at) >= self.max_keys

    def _forget_stale(self, now: float) -> None:
        """Drop the keys last logged an interval or more ago (the oldest come first)."""
        while self._logged_at:
            key, at = next(iter(self._logged_at.items()))
            if now - at < self.interval:
                return
            del self._logged_at[key]
            self._unlogged.pop(key, None)

    def pending(self) -> dict[str, int]:
        """Occurrences not yet logged, by key (for a last line before closing)."""
        return dict(self._unlogged)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in _fields(record).items():
            entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def _logfmt_value(value: Any) -> str:
    text = redact(str(value))
    if text == "" or any(c in text for c in ' ="\\') or any(ord(c) < 32 for c in text):
        return json.dumps(text)
    return text


class LogfmtFormatter(logging.Formatter):
    """``ts=… level=info logger=control msg="…" key=value`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            "ts="
            + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            "msg=" + _logfmt_value(record.getMessage()),
        ]
        parts += [f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append("exc=" + _logfmt_value(self.formatException(record.exc_info)))
        return " ".join(parts)


def setup(fmt: str = "text", level: str = "info") -> None:
    """Configure the root logger (and uvicorn's) to write structured lines to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # uvicorn's access log repeats every request; keep it at debug unless asked.
    logging.getLogger("uvicorn.access").setLevel(
        logging.DEBUG if level == "debug" else logging.WARNING
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
