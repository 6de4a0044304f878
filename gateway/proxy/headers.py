"""Header rewriting between the public client and the agent (RFC 9110 §7.6.1, §7.8).

Theory of operation
-------------------
Pure functions over header lists (``list[tuple[bytes, bytes]]``, names already
lower-cased by the reader, ``h1/``).

* Hop-by-hop fields are removed in both directions: the fixed set below plus every
  field named in ``Connection`` (RFC 9110 §7.6.1), except ``Host`` and
  ``Content-Length``, which a client must not be able to "name away".  Message framing is then re-stated
  explicitly: a request keeps ``Content-Length`` or gets ``Transfer-Encoding: chunked``
  back (the reader validated and de-chunked it; it is re-chunked towards the agent);
  a response keeps ``Content-Length`` and otherwise ``h1.frame_response`` chooses
  chunked or close.
* For an Upgrade (WebSocket) exchange, ``Connection: upgrade`` and ``Upgrade`` are
  carried through (RFC 9110 §7.8), since the agent must see them to switch.
* The client address: the TCP peer, unless the peer is a configured trusted proxy
  (a load balancer in front of the gateway); then it is the right-most address in
  ``X-Forwarded-For`` that is not itself a trusted proxy (``client_address``).
* Forwarding fields, decided here once:
  - ``X-Forwarded-For``: the client's TCP peer address is **appended** to whatever
    the client sent.  We never trust or strip the incoming list; the right-most entry
    is the one the gateway vouches for, which is how nginx
    (``$proxy_add_x_forwarded_for``) and most frameworks' "trusted hops = 1" expect it.
  - ``X-Real-IP``: overwritten with the client address (above), so an agent that
    wants one trustworthy value need not parse the list.
  - ``X-Forwarded-Host`` / ``X-Forwarded-Proto``: overwritten (the gateway is the
    edge; a client-supplied value would be a lie).
  - ``Host`` is passed through unchanged: the application behind the agent sees it
    (the agent splices bytes and never parses HTTP).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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

_FORWARDED_OVERWRITE = frozenset(
    {
        b"x-real-ip",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        # who the client is, as the gateway's access policy found: never the client's say
        b"x-auth-user",
        b"x-auth-email",
        b"x-auth-groups",
    }
)
#: cookies the gateway's access policy owns (``gateway/access``): never sent to an app
_OWN_COOKIE_PREFIX = b"kkm_"


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            if b"," in value:
                tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
            else:  # the usual one token ("keep-alive", "close"): no split, no generator
                token = value.strip().lower()
                if token:
                    tokens.add(token)
    return tokens


def get_header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of a header field (name in lower case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def is_upgrade_request(headers: Headers) -> bool:
    return b"upgrade" in _connection_tokens(headers) and get_header(headers, b"upgrade") is not None


#: fields a ``Connection`` header may not remove: routing and framing depend on them
#: (``Connection: host, content-length`` must not turn a request into another one)
_NEVER_NAMED_AWAY = frozenset({b"host", b"content-length"})


def _hop_by_hop(headers: Headers) -> frozenset[bytes]:
    """The fields to drop: the fixed set and those ``Connection`` names."""
    named = _connection_tokens(headers)
    return HOP_BY_HOP | (named - _NEVER_NAMED_AWAY) if named else HOP_BY_HOP


def strip_hop_by_hop(headers: Headers, *, keep_upgrade: bool = False) -> Headers:
    """Remove hop-by-hop fields; optionally keep ``Upgrade`` (+ ``Connection: upgrade``)."""
    drop = _hop_by_hop(headers)
    out = [field for field in headers if field[0] not in drop]
    if keep_upgrade:
        upgrade = get_header(headers, b"upgrade")
        if upgrade is not None:
            out.append((b"connection", b"upgrade"))
            out.append((b"upgrade", upgrade))
    return out


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """Parse trusted-proxy CIDRs (``ValueError`` names the bad one)."""
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP network: {cidr!r}") from None
    return tuple(out)


def is_trusted_proxy(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``address`` is inside one of the trusted-proxy networks."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(peer_ip: str, headers: Headers, trusted: tuple[Network, ...]) -> str:
    """Who the client is: the TCP peer, or, behind trusted proxies, the right-most
    ``X-Forwarded-For`` hop that is not a trusted proxy (RFC 7239 §5.2 reasoning)."""
    if not trusted or not is_trusted_proxy(peer_ip, trusted):
        return peer_ip
    hops = [
        hop.strip().decode("latin-1")
        for name, value in headers
        if name == b"x-forwarded-for"
        for hop in value.split(b",")
        if hop.strip()
    ]
    candidate = peer_ip
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # garbage: do not look further left than the last trusted hop
        candidate = hop
        if not is_trusted_proxy(hop, trusted):
            break
    return candidate


def request_headers_for_agent(
    headers: Headers,
    *,
    client_ip: str,
    proto: str,
    chunked: bool,
    upgrade: bool,
    peer_ip: str | None = None,
    identity: list[tuple[bytes, bytes]] | None = None,
    strip_own_cookies: bool = False,
) -> Headers:
    """The header list to send to the agent for a client's request.

    ``peer_ip`` (default ``client_ip``) is appended to ``X-Forwarded-For``;
    ``client_ip`` becomes ``X-Real-IP``.  Host goes first (RFC 9110 §7.2).  Any
    ``X-Auth-*`` field the client sent is dropped; ``identity`` (the access policy's
    ``X-Auth-*`` fields) is added; ``strip_own_cookies`` removes the gateway's session
    cookies (``kkm_*``) from ``Cookie``.
    """
    drop = _hop_by_hop(headers)
    host: tuple[bytes, bytes] | None = None
    prior: list[bytes] = []
    out: Headers = []
    for field in headers:  # one pass: this runs for every request
        name = field[0]
        if name in drop or name in _FORWARDED_OVERWRITE:
            continue
        if name == b"x-forwarded-for":
            value = field[1].strip()
            if value:
                prior.append(value)
        elif name == b"host" and host is None:
            host = field
        elif strip_own_cookies and name == b"cookie" and _OWN_COOKIE_PREFIX in field[1]:
            kept = without_own_cookies(field[1])
            if kept:
                out.append((name, kept))
        else:
            out.append(field)
    if upgrade:
        protocol = get_header(headers, b"upgrade")
        if protocol is not None:
            out += [(b"connection", b"upgrade"), (b"upgrade", protocol)]
    peer = (peer_ip or client_ip).encode("ascii", "replace")
    out += [
        (b"x-forwarded-for", b", ".join([*prior, peer]) if prior else peer),
        (b"x-real-ip", client_ip.encode("ascii", "replace")),
        (b"x-forwarded-host", host[1] if host is not None else b""),
        (b"x-forwarded-proto", proto.encode("ascii")),
    ]
    if identity:
        out += identity
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    return out if host is None else [host, *out]


def without_own_cookies(value: bytes) -> bytes:
    """A Cookie value without the gateway's cookies (b"" if nothing else is left)."""
    kept = [
        pair
        for pair in (p.strip() for p in value.split(b";"))
        if pair and not pair.startswith(_OWN_COOKIE_PREFIX)
    ]
    return b"; ".join(kept)


#: the last forwarding field (without its CRLF), after a head relayed as it came
PROTO_FIELD = {proto: b"\r\nx-forwarded-proto: %s" % proto.encode() for proto in ("http", "https")}


def forwarding_fields(peer_ip: str) -> bytes:
    """``X-Forwarded-For`` and ``X-Real-IP`` naming the peer, then the start of
    ``X-Forwarded-Host``: with the Host value and ``PROTO_FIELD`` after it, the fields
    ``request_headers_for_agent`` adds to a request that names no other client."""
    peer = peer_ip.encode("ascii", "replace")
    return b"x-forwarded-for: %s\r\nx-real-ip: %s\r\nx-forwarded-host: " % (peer, peer)


def verbatim_request_head(
    raw: bytes,
    peer_ip: str,
    host: bytes,
    proto: str,
    identity: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A request head as the agent gets it when it goes as it came (``RequestHead.raw``,
    see ``h1/_scan.scan_request``): its bytes, then the forwarding fields and the access
    policy's identity fields (the proxy builds the same join with ``forwarding_fields``
    made once per connection)."""
    end = PROTO_FIELD[proto]
    if identity:
        end += b"".join(b"\r\n%s: %s" % field for field in identity)
    return b"".join((raw, forwarding_fields(peer_ip), host, end, b"\r\n\r\n"))


def response_headers_for_client(headers: Headers, *, upgrade: bool = False) -> Headers:
    """The header list to send to the client for the agent's response."""
    return strip_hop_by_hop(headers, keep_upgrade=upgrade)
