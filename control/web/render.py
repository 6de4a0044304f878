"""Jinja2 environment of the dashboard, its filters, and the traffic chart (SVG).

Autoescaping is on for every template: a name, a domain or a target shows as text,
never as markup.  The chart is drawn on the server as a small SVG (no script, no
third-party library): one bar per minute of the last hour, requests as bars and
errors over them, with a text alternative for screen readers.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from xml.sax.saxutils import escape

from jinja2 import Environment, FileSystemLoader, select_autoescape

from control.traffic import Bucket

TEMPLATES = Path(__file__).resolve().parent / "templates"


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover (the loop returns)


def human_age(seconds: float | None) -> str:
    """``12 s ago``, ``3 min ago``, ``2 h ago``, ``4 d ago``; "never" for None."""
    if seconds is None or math.isnan(seconds):
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def timestamp(value: float | None) -> str:
    if value is None:
        return "-"
    try:
        return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "-"


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["bytes"] = human_bytes
    env.filters["age"] = human_age
    env.filters["timestamp"] = timestamp
    return env


def traffic_svg(series: list[Bucket], title: str, width: int = 240, height: int = 48) -> str:
    """A bar chart of requests per minute (errors in a second colour) as an SVG document."""
    peak = max((b.requests for b in series), default=0)
    total = sum(b.requests for b in series)
    errors = sum(b.errors for b in series)
    bytes_total = sum(b.bytes_in + b.bytes_out for b in series)
    label = (
        f"{title}: {total} requests, {errors} errors, {human_bytes(bytes_total)} "
        f"in the last {len(series)} minutes"
    )
    bar = width / max(1, len(series))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(label, {chr(34): "&quot;"})}">',
        f"<title>{escape(label)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f3f5f8"/>',
        f'<line x1="0" y1="{height - 0.5}" x2="{width}" y2="{height - 0.5}" stroke="#9aa5b1"/>',
    ]
    if peak:
        for i, bucket in enumerate(series):
            if not bucket.requests and not bucket.errors:
                continue
            h = max(1.0, (height - 4) * bucket.requests / peak)
            x = i * bar
            parts.append(
                f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(1.0, bar - 1):.1f}" '
                f'height="{h:.1f}" fill="#2563eb"/>'
            )
            if bucket.errors:
                e = max(1.0, (height - 4) * min(bucket.errors, peak) / peak)
                parts.append(
                    f'<rect x="{x:.1f}" y="{height - e:.1f}" width="{max(1.0, bar - 1):.1f}" '
                    f'height="{e:.1f}" fill="#b91c1c"/>'
                )
    parts.append("</svg>")
    return "".join(parts)
