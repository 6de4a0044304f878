"""TLS termination: SNI picks each tunnel domain's certificate.

Theory of operation
-------------------
Certificates come from two places: Control's ``config`` (uploaded by an admin or
obtained by some gateway and shared) and this gateway's own ACME client.  Control's
win when both exist for a name (DESIGN.md: "certificates in the config are used
first").  Each certificate becomes one ``ssl.SSLContext``; the listener's context has
an SNI callback that swaps in the matching one (exact name, then ``*.parent``
wildcard).  A name we hold no certificate for gets a self-signed default certificate
so the client sees a clear error page rather than a reset.  Python's ``ssl`` loads
certificates only from files, so PEMs are written to a 0700 directory; private keys
there are 0600.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common import certificates
from common.logs import kv
from common.protocol import CertificateSpec

log = logging.getLogger("gateway.tls")


@dataclass(frozen=True)
class Certificate:
    """A chain and its key for one domain (or ``*.domain``)."""

    domain: str
    chain_pem: str
    key_pem: str
    not_after: float
    source: str  # "control" | "acme" | "default"


def self_signed(name: str, days: int = 365) -> Certificate:
    """A throwaway self-signed certificate for ``name`` (the default one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificates.self_signed(key, [name], days)
    return Certificate(
        name,
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        cert.not_valid_after_utc.timestamp(),
        "default",
    )


class CertificateStore:
    """Per-domain TLS contexts and the SNI callback that chooses among them."""

    def __init__(self, directory: Path, alpn: tuple[str, ...] = ("http/1.1",)) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self.alpn = alpn
        self._from_control: dict[str, Certificate] = {}
        self._from_acme: dict[str, Certificate] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._fingerprints: dict[str, str] = {}
        self.default = self._context(self_signed("kakuremichi.invalid"))
        self.default.sni_callback = self._choose

    def server_context(self) -> ssl.SSLContext:
        """The context to give the HTTPS listener."""
        return self.default

    def _context(self, cert: Certificate) -> ssl.SSLContext:
        digest = hashlib.sha256((cert.chain_pem + cert.key_pem).encode()).hexdigest()[:32]
        chain_file = self.directory / f"{digest}.crt"
        key_file = self.directory / f"{digest}.key"
        if not key_file.exists():
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(cert.key_pem)
            chain_file.write_text(cert.chain_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(list(self.alpn))
        context.load_cert_chain(chain_file, key_file)
        return context

    def _rebuild(self) -> None:
        merged = {**self._from_acme, **self._from_control}  # Control's win
        contexts: dict[str, ssl.SSLContext] = {}
        fingerprints: dict[str, str] = {}
        for domain, cert in merged.items():
            fingerprint = hashlib.sha256(cert.chain_pem.encode()).hexdigest()
            if self._fingerprints.get(domain) == fingerprint and domain in self._contexts:
                contexts[domain] = self._contexts[domain]
            else:
                try:
                    contexts[domain] = self._context(cert)
                except (ssl.SSLError, OSError, ValueError) as exc:
                    log.error(
                        "unusable certificate skipped", extra=kv(domain=domain, error=str(exc))
                    )
                    continue
                log.info("certificate loaded", extra=kv(domain=domain, source=cert.source))
            fingerprints[domain] = fingerprint
        self._contexts, self._fingerprints = contexts, fingerprints

    def set_control_certificates(self, certificates: Iterable[CertificateSpec]) -> None:
        """Replace the certificates that came from Control's config (parsed by
        ``common.protocol``; one that OpenSSL refuses is skipped with its reason)."""
        self._from_control = {
            c.domain: Certificate(c.domain, c.certificate, c.private_key, c.not_after, "control")
            for c in certificates
        }
        self._rebuild()

    def add_acme_certificate(self, cert: Certificate) -> None:
        self._from_acme[cert.domain] = cert
        self._rebuild()

    def certificate_for(self, name: str) -> Certificate | None:
        name = name.lower().rstrip(".")
        merged = {**self._from_acme, **self._from_control}
        if name in merged:
            return merged[name]
        parent = name.split(".", 1)[1] if "." in name else ""
        return merged.get("*." + parent) if parent else None

    def context_for(self, name: str) -> ssl.SSLContext | None:
        name = name.lower().rstrip(".")
        context = self._contexts.get(name)
        if context is None and "." in name:
            context = self._contexts.get("*." + name.split(".", 1)[1])
        return context

    def _choose(
        self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
    ) -> None:
        if name:
            context = self.context_for(name)
            if context is not None:
                sock.context = context
