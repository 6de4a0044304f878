"""The gateway's own small error pages (404 unknown host, 502, 504, 429, ...).

Theory of operation
-------------------
Every page the gateway writes itself is a tiny self-contained HTML document naming the
status and a one-line reason, plus a ``Server`` field saying it came from the gateway
(so users can tell a gateway 502 from an application's).  Nothing from the request is
echoed into the page, except the host name HTML-escaped, and there are no stack traces.
A client that asks for ``text/plain`` only (curl with ``-H 'Accept: text/plain'``) gets
the same text without markup.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from http import HTTPStatus

SERVER_NAME = b"kakuremichi-gateway"


@dataclass(frozen=True, slots=True)
class ErrorPage:
    """A rendered error response: status, headers and body."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


def render(
    status: int,
    reason: str,
    *,
    plain: bool = False,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> ErrorPage:
    """Build the page for ``status`` explaining ``reason`` (already user-safe text)."""
    phrase = _phrase(status)
    if plain:
        body = f"{status} {phrase}\n{reason}\n".encode()
        ctype = b"text/plain; charset=utf-8"
    else:
        title = html.escape(f"{status} {phrase}")
        body = (
            '<!doctype html>\n<html><head><meta charset="utf-8">'
            f"<title>{title}</title></head>\n"
            f"<body><h1>{title}</h1>\n<p>{html.escape(reason)}</p>\n"
            "<hr><p><small>kakuremichi gateway</small></p></body></html>\n"
        ).encode()
        ctype = b"text/html; charset=utf-8"
    headers = [
        (b"content-type", ctype),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"server", SERVER_NAME),
        *(extra_headers or []),
    ]
    return ErrorPage(status, phrase.encode(), headers, body)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` for a status line."""
    return _phrase(status).encode()


def wants_plain(accept: bytes | None) -> bool:
    """True when the client's Accept header prefers text/plain over HTML."""
    if not accept:
        return False
    value = accept.lower()
    return b"text/plain" in value and b"text/html" not in value
