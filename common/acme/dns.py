"""DNS-01 providers: how an ACME client puts ``_acme-challenge`` TXT records in DNS.

Theory of operation
-------------------
A :class:`DnsProvider` adds one TXT record (``present``) and removes exactly that
value again (``cleanup``: a wildcard and its base name share one record name, each
order's value comes and goes on its own); ``zones`` says which names it can prove
(the names at or under them), so Control knows which wildcard tunnels a gateway can
get certificates for.  Both calls return once the authoritative server has the change.

The first provider is :class:`Rfc2136Provider`: dynamic DNS UPDATE (RFC 2136) signed
with TSIG (RFC 8945) to the zone's primary server (BIND, Knot, PowerDNS, Windows DNS
all take it).  The secret never appears in a log line or an error.

Adding a provider (a DNS host's HTTP API, say):

1. subclass :class:`DnsProvider` with ``present``/``cleanup`` (async, raising
   :class:`DnsError` with a message safe to log) and ``zones``;
2. register a factory in :data:`PROVIDERS` under its name: it takes the
   ``--acme-dns-*`` settings as a mapping (``server``, ``zone``, ``tsig_key``,
   ``tsig_algorithm``, ``tsig_secret``, or new ones added next to them in
   ``gateway/main.py``) and raises :class:`DnsError` for a missing or bad one;
3. ``--acme-dns-provider <name>`` then selects it.
"""

from __future__ import annotations

import abc
import base64
import binascii
import logging
from collections.abc import Callable, Mapping

import dns.asyncquery
import dns.exception
import dns.name
import dns.rcode
import dns.tsig
import dns.update

from common.logs import kv

log = logging.getLogger("kakuremichi.acme.dns")

TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224")


class DnsError(Exception):
    """A record could not be changed; the message is safe to log (no secret)."""


def under(name: str, zone: str) -> bool:
    """Whether ``name`` (a ``*.`` wildcard counts as its parent) is ``zone`` or below."""
    name = name.lower().rstrip(".")
    name = name[2:] if name.startswith("*.") else name
    zone = zone.lower().rstrip(".")
    return name == zone or name.endswith("." + zone)


class DnsProvider(abc.ABC):
    """Puts ``_acme-challenge`` TXT records in the zones it manages."""

    #: the provider's name in ``--acme-dns-provider``
    kind = ""

    @property
    @abc.abstractmethod
    def zones(self) -> tuple[str, ...]:
        """The zones it can change (names at or under them can be proven)."""

    def covers(self, name: str) -> bool:
        return any(under(name, zone) for zone in self.zones)

    @abc.abstractmethod
    async def present(self, record: str, value: str) -> None:
        """Add ``value`` to the TXT record ``record`` (a fully qualified name)."""

    @abc.abstractmethod
    async def cleanup(self, record: str, value: str) -> None:
        """Remove ``value`` from the TXT record ``record`` (other values stay)."""


class Rfc2136Provider(DnsProvider):
    """Dynamic updates (RFC 2136) signed with TSIG, over TCP to the zone's primary."""

    kind = "rfc2136"

    def __init__(
        self,
        server: str,
        port: int,
        zone: str,
        key_name: str,
        secret: bytes,
        algorithm: str = "hmac-sha256",
        ttl: int = 60,
        timeout: float = 10.0,
    ) -> None:
        if algorithm not in TSIG_ALGORITHMS:
            raise DnsError(f"TSIG algorithm {algorithm!r} is not one of {TSIG_ALGORITHMS}")
        self.server = server
        self.port = port
        self.zone = dns.name.from_text(zone)
        self.key_name = dns.name.from_text(key_name)
        self._keyring = {self.key_name: dns.tsig.Key(self.key_name, secret, algorithm)}
        self.algorithm = algorithm
        self.ttl = ttl
        self.timeout = timeout

    def __repr__(self) -> str:  # never the secret
        return f"Rfc2136Provider({self.server}:{self.port}, zone={self.zone}, key={self.key_name})"

    @property
    def zones(self) -> tuple[str, ...]:
        return (self.zone.to_text(omit_final_dot=True),)

    async def _update(self, verb: str, record: str, value: str) -> None:
        name = dns.name.from_text(record)
        if not name.is_subdomain(self.zone):
            raise DnsError(f"{record} is not in the zone {self.zone}")
        update = dns.update.UpdateMessage(
            self.zone, keyring=self._keyring, keyname=self.key_name, keyalgorithm=self.algorithm
        )
        relative = name.relativize(self.zone)
        if verb == "add":
            update.add(relative, self.ttl, "TXT", f'"{value}"')
        else:
            update.delete(relative, "TXT", f'"{value}"')
        where = f"{self.server}:{self.port}"
        try:
            response = await dns.asyncquery.tcp(
                update, self.server, timeout=self.timeout, port=self.port
            )
        except dns.exception.Timeout:
            raise DnsError(f"{where} did not answer the update in {self.timeout:.0f}s") from None
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            raise DnsError(f"update to {where} failed: {type(exc).__name__}: {exc}") from None
        code = response.rcode()
        if code != dns.rcode.NOERROR:
            raise DnsError(
                f"{where} refused the update of {record} ({dns.rcode.to_text(code)}"
                + (": check the TSIG key and the zone's update policy)" if code else ")")
            )
        log.info("dns record changed", extra=kv(action=verb, record=record, server=where))

    async def present(self, record: str, value: str) -> None:
        await self._update("add", record, value)

    async def cleanup(self, record: str, value: str) -> None:
        await self._update("delete", record, value)


def _rfc2136(options: Mapping[str, str | None]) -> DnsProvider:
    def need(key: str) -> str:
        value = options.get(key)
        if not value:
            raise DnsError(f"the rfc2136 provider needs --acme-dns-{key.replace('_', '-')}")
        return value

    server = need("server")
    port_text: str | None
    if server.startswith("["):  # [IPv6] or [IPv6]:PORT
        host, _, rest = server[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else (None if rest else "")
    elif server.count(":") == 1:
        host, _, port_text = server.partition(":")
    else:  # a name, an IPv4 address or a bare IPv6 address
        host, port_text = server, ""
    if (
        not host
        or port_text is None
        or (port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535))
    ):
        raise DnsError(f"--acme-dns-server {server[:100]!r}: give HOST, HOST:PORT or [IPv6]:PORT")
    port = int(port_text) if port_text else 53
    try:
        secret = base64.b64decode(need("tsig_secret"), validate=True)
    except (binascii.Error, ValueError):
        raise DnsError("--acme-dns-tsig-secret is not base64") from None
    if not secret:
        raise DnsError("--acme-dns-tsig-secret is empty")
    try:
        return Rfc2136Provider(
            host,
            port,
            need("zone"),
            need("tsig_key"),
            secret,
            options.get("tsig_algorithm") or "hmac-sha256",
        )
    except dns.exception.DNSException as exc:
        raise DnsError(f"--acme-dns-zone/--acme-dns-tsig-key: {exc}") from None


#: provider name → factory from the ``--acme-dns-*`` settings (see the module docstring)
PROVIDERS: dict[str, Callable[[Mapping[str, str | None]], DnsProvider]] = {
    "rfc2136": _rfc2136,
}


def dns_provider(kind: str, options: Mapping[str, str | None]) -> DnsProvider:
    """The provider ``kind`` built from its settings (:class:`DnsError` if it cannot be)."""
    factory = PROVIDERS.get(kind)
    if factory is None:
        raise DnsError(f"unknown DNS provider {kind!r}; known: {', '.join(sorted(PROVIDERS))}")
    return factory(options)
