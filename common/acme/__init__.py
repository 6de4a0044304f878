"""ACME (RFC 8555) for every program: the client, HTTP-01 responses, DNS-01 providers.

It lives below the programs because both use it: gateways order the tunnels'
certificates (under a lease from Control, ``control/acme.py``), and Control orders its
own (``--acme-domain``, ``control/selfacme.py``).  ``client.py`` is the order itself,
``dns.py`` the DNS-01 provider interface and its RFC 2136 provider.
"""

from common.acme.client import (
    AcmeClient,
    AcmeFailure,
    ChallengeStore,
    Http01Responder,
    Issued,
    LocalHttp01,
)
from common.acme.dns import DnsError, DnsProvider, Rfc2136Provider, dns_provider

__all__ = [
    "AcmeClient",
    "AcmeFailure",
    "ChallengeStore",
    "DnsError",
    "DnsProvider",
    "Http01Responder",
    "Issued",
    "LocalHttp01",
    "Rfc2136Provider",
    "dns_provider",
]
