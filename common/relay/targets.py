"""Tunnel targets on the agent's side: ``host:port`` or an ``http(s)://`` URL."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlsplit

#: what a path may carry unescaped (RFC 3986 §3.3 pchar and "/"; "%" keeps the
#: escapes it already has); everything else, Unicode included, is sent as UTF-8 %XX
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"


@dataclass(frozen=True)
class Target:
    """Where a tunnel's traffic goes on the agent's machine."""

    host: str
    port: int
    tls: bool = False
    path_prefix: str = ""
    http: bool = False  # given as a URL: the agent speaks HTTP to it

    @classmethod
    def parse(cls, text: str) -> Target:
        """Parse Control's target syntax; raises ValueError with the reason."""
        text = text.strip()
        if "://" in text:
            parts = urlsplit(text)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"unsupported target URL {text!r}")
            tls = parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            # the prefix goes on the wire in front of every request target: ASCII only
            prefix = quote(parts.path.rstrip("/"), safe=_PATH_SAFE)
            return cls(parts.hostname, port, tls, prefix, http=True)
        host, sep, port_text = text.rpartition(":")
        if (
            not sep
            or not (port_text.isascii() and port_text.isdigit())
            or not 1 <= int(port_text) <= 65535
        ):
            raise ValueError(f"target {text!r} is not host:port")
        return cls(host.strip("[]"), int(port_text))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.http:
            return f"{'https' if self.tls else 'http'}://{host}:{self.port}{self.path_prefix}"
        return f"{host}:{self.port}"
