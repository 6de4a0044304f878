"""Header rewriting between the public client and the agent (RFC 9110 §7.6.1, §7.8).

Theory of operation
-------------------
Pure functions over h11 header lists (``list[tuple[bytes, bytes]]``, names already
lower-cased by h11).

* Hop-by-hop fields are removed in both directions: the fixed set below plus every
  field named in ``Connection`` (RFC 9110 §7.6.1).  Message framing is then re-stated
  explicitly: a request keeps ``Content-Length`` or gets ``Transfer-Encoding: chunked``
  back (h11 validated and de-chunked it, and re-chunks it towards the agent); a
  response keeps ``Content-Length`` and otherwise lets h11 choose chunked or close.
* For an Upgrade (WebSocket) exchange, ``Connection: upgrade`` and ``Upgrade`` are
  carried through (RFC 9110 §7.8), since the agent must see them to switch.
* Forwarding fields, decided here once:
  - ``X-Forwarded-For``: the client's TCP peer address is **appended** to whatever
    the client sent.  We never trust or strip the incoming list; the right-most entry
    is the one the gateway vouches for, which is how nginx
    (``$proxy_add_x_forwarded_for``) and most frameworks' "trusted hops = 1" expect it.
  - ``X-Real-IP``: overwritten with the TCP peer address, so an agent that wants one
    trustworthy value need not parse the list.
  - ``X-Forwarded-Host`` / ``X-Forwarded-Proto``: overwritten (the gateway is the
    edge; a client-supplied value would be a lie).
  - ``Host`` is passed through unchanged: the agent routes on it.
"""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_FORWARDED_OVERWRITE = frozenset({b"x-real-ip", b"x-forwarded-host", b"x-forwarded-proto"})


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def get_header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of a header field (name in lower case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def is_upgrade_request(headers: Headers) -> bool:
    return b"upgrade" in _connection_tokens(headers) and get_header(headers, b"upgrade") is not None


def strip_hop_by_hop(headers: Headers, *, keep_upgrade: bool = False) -> Headers:
    """Remove hop-by-hop fields; optionally keep ``Upgrade`` (+ ``Connection: upgrade``)."""
    named = _connection_tokens(headers)
    drop = HOP_BY_HOP | named
    out = [(k, v) for k, v in headers if k not in drop]
    if keep_upgrade:
        upgrade = get_header(headers, b"upgrade")
        if upgrade is not None:
            out.append((b"connection", b"upgrade"))
            out.append((b"upgrade", upgrade))
    return out


def request_headers_for_agent(
    headers: Headers,
    *,
    client_ip: str,
    proto: str,
    chunked: bool,
    upgrade: bool,
) -> Headers:
    """The header list to send to the agent for a client's request."""
    host = get_header(headers, b"host") or b""
    out = strip_hop_by_hop(headers, keep_upgrade=upgrade)
    prior = [v.strip() for k, v in out if k == b"x-forwarded-for" and v.strip()]
    out = [(k, v) for k, v in out if k not in _FORWARDED_OVERWRITE and k != b"x-forwarded-for"]
    ip = client_ip.encode("ascii", "replace")
    out.append((b"x-forwarded-for", b", ".join([*prior, ip])))
    out.append((b"x-real-ip", ip))
    out.append((b"x-forwarded-host", host))
    out.append((b"x-forwarded-proto", proto.encode("ascii")))
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    return out


def response_headers_for_client(headers: Headers, *, upgrade: bool = False) -> Headers:
    """The header list to send to the client for the agent's response."""
    return strip_hop_by_hop(headers, keep_upgrade=upgrade)
