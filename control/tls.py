"""HTTPS for Control: one server ``SSLContext`` whose certificate is reloaded on change.

Theory of operation
-------------------
``ControlTls`` owns the ``ssl.SSLContext`` uvicorn's listener serves with.  Its
certificate chain comes from a PEM file and key (``--tls-cert``/``--tls-key``, e.g.
written by certbot or a secret mount), from Control's own ACME client
(``--acme-domain``: ``control.acme``), or from a certificate Control generates once
and keeps in its data directory (``--tls-self-signed``: enrollment tokens pin its key,
so agents and gateways need no CA).

*Reload.*  :meth:`ControlTls.watch` looks at the files' modification times and sizes
every ``interval`` seconds; when they change, the pair is first loaded into a scratch
context (so a half-written file or a key that does not match is refused), then into
the live context with ``load_cert_chain``, which OpenSSL applies to every handshake
from then on; connections already open keep the certificate they started with.  A
pair that fails to load is logged once per change and the previous one keeps
serving.

*Pin.*  :attr:`ControlTls.pin` is the SHA-256 of the current leaf's public key
(``common.token.spki_pin``), which enrollment tokens carry.  A renewal that keeps the
key keeps the pin (the generated certificate and Control's ACME renewals reuse theirs);
a new key is logged with a warning that tokens issued before pin the old one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.certificates import self_signed_pem
from common.logs import kv
from common.token import spki_pin

log = logging.getLogger("control.tls")

#: seconds between looks at the certificate files
RELOAD_INTERVAL = 10.0


class TlsError(Exception):
    """The certificate or key cannot be used; the message says which file and why."""


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size)


def load_leaf(cert_file: Path) -> x509.Certificate:
    """The first certificate of a PEM chain file (:class:`TlsError` if none)."""
    try:
        data = cert_file.read_bytes()
    except OSError as exc:
        raise TlsError(f"cannot read {cert_file}: {exc.strerror}") from exc
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError) as exc:
        raise TlsError(f"{cert_file} holds no PEM certificate") from exc


class ControlTls:
    """The listener's TLS context and the files it reloads from (module docstring)."""

    def __init__(self, cert_file: Path, key_file: Path, interval: float = RELOAD_INTERVAL) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.interval = interval
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self.pin = ""
        self.not_after = 0.0
        self.reloads = 0
        self._stamps: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None)
        self._load(self.context)  # TlsError at start: a configuration error

    def _load(self, target: ssl.SSLContext) -> None:
        stamps = (_stamp(self.cert_file), _stamp(self.key_file))
        leaf = load_leaf(self.cert_file)
        scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            scratch.load_cert_chain(self.cert_file, self.key_file)
        except FileNotFoundError as exc:
            raise TlsError(f"cannot read {exc.filename}: {exc.strerror}") from exc
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(
                f"{self.cert_file} and {self.key_file} are not a certificate chain and its "
                f"private key ({exc})"
            ) from exc
        target.load_cert_chain(self.cert_file, self.key_file)
        self._stamps = stamps
        self.pin = spki_pin(leaf)
        self.not_after = leaf.not_valid_after_utc.timestamp()

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed since the last load; True if reloaded."""
        stamps = (_stamp(self.cert_file), _stamp(self.key_file))
        if stamps == self._stamps:
            return False
        old_pin = self.pin
        try:
            self._load(self.context)
        except TlsError as exc:
            self._stamps = stamps  # logged once per change, not every interval
            log.error(
                "the new certificate cannot be used; the previous one keeps serving",
                extra=kv(error=str(exc)[:300]),
            )
            return False
        self.reloads += 1
        log.info(
            "certificate reloaded",
            extra=kv(
                file=str(self.cert_file),
                pin_sha256=self.pin,
                not_after=dt.datetime.fromtimestamp(self.not_after, dt.UTC).isoformat(),
            ),
        )
        if old_pin and old_pin != self.pin:
            log.warning(
                "the certificate's key changed: enrollment tokens issued before pin the old "
                "key and will be refused by their agents and gateways; rotate their keys",
                extra=kv(old_pin_sha256=old_pin, pin_sha256=self.pin),
            )
        return True

    async def watch(self) -> None:
        """Reload on change, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.interval)
            self.reload_if_changed()


def write_pair(cert_file: Path, key_file: Path, chain_pem: str, key_pem: str) -> None:
    """Write a chain and its key atomically (key 0600), key first so a watcher that
    sees the new certificate finds the new key already in place."""
    for path, data, mode in ((key_file, key_pem, 0o600), (cert_file, chain_pem, 0o644)):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(data)
        os.replace(tmp, path)


def key_pem_of(key_file: Path) -> str | None:
    """The PEM private key in ``key_file`` if it is an EC key we can reuse, else None."""
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def ensure_self_signed(
    directory: Path, names: Sequence[str], days: int = 3650
) -> tuple[Path, Path]:
    """A self-signed certificate for ``names`` in ``directory`` (``control.crt`` and
    ``control.key``), made once and kept; remade with the same key when the names
    change or it expires within 30 days, so tokens' pins stay valid."""
    cert_file, key_file = directory / "control.crt", directory / "control.key"
    wanted = sorted(set(names))
    try:
        leaf = load_leaf(cert_file)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = sorted(
            [
                *san.get_values_for_type(x509.DNSName),
                *map(str, san.get_values_for_type(x509.IPAddress)),
            ]
        )
        left = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
        if have == wanted and left > dt.timedelta(days=30) and key_pem_of(key_file):
            return cert_file, key_file
    except (TlsError, x509.ExtensionNotFound):
        pass
    key_pem = key_pem_of(key_file)
    if key_pem is None:
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        loaded = serialization.load_pem_private_key(key_pem.encode(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        key = loaded
    write_pair(
        cert_file,
        key_file,
        self_signed_pem(key, wanted, days),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )
    log.info("generated a self-signed certificate", extra=kv(names=",".join(wanted)))
    return cert_file, key_file
