"""Control's own certificate from ACME (``--acme-domain``), renewed and reloaded in place.

Theory of operation
-------------------
*Challenge: HTTP-01.*  Control answers ``/.well-known/acme-challenge/`` on a small
plain-HTTP listener of its own (``--acme-http-port``, default 80; everything else gets
a redirect to Control's HTTPS URL), and publishes the same responses to every
connected gateway (``control/acme.py``), so the CA's request may also land on a
gateway when Control's name points at one.  TLS-ALPN-01 would have needed no second
port, but Python's ``ssl`` chooses the certificate from the SNI name alone, before
ALPN is negotiated: during a validation every client naming Control's host would have
been served the self-signed challenge certificate.  HTTP-01 leaves Control's HTTPS port
untouched.

*Files and key.*  The certificate lives in ``<data-dir>/tls/acme.crt`` and
``acme.key`` and is served by :class:`~control.tls.ControlTls` like ``--tls-cert``.
Before the first certificate arrives the same key serves a self-signed placeholder
for the name (so Control starts at once, and agents pinning its key keep working);
every order reuses the key, so the pin in enrollment tokens survives renewals.

*Renewal.*  :meth:`ControlAcme.run` orders when the certificate is not from the CA
yet or expires within ``renew_before`` (default 30 days), writes the pair atomically
and reloads the listener's context at once (connections already open keep theirs);
then it sleeps until the next renewal is due (looking at least every
``check_interval``).  A failed order is logged and retried after 1 min, doubling up to
6 h, while the current certificate keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.acme import AcmeClient, AcmeFailure, ChallengeStore
from common.acme.client import new_key_pem
from common.certificates import self_signed_pem
from common.logs import kv
from control.tls import ControlTls, TlsError, key_pem_of, load_leaf, write_pair

log = logging.getLogger("control.acme")

RENEW_BEFORE = 30 * 86400.0
CHECK_INTERVAL = 12 * 3600.0
BACKOFF_FIRST = 60.0
BACKOFF_MAX = 6 * 3600.0
#: the plain-HTTP listener: bytes and seconds a request head may take
MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0


def acme_files(data_dir: Path) -> tuple[Path, Path]:
    """Where Control's ACME certificate and key live."""
    return data_dir / "tls" / "acme.crt", data_dir / "tls" / "acme.key"


def prepare(data_dir: Path, domain: str) -> tuple[Path, Path]:
    """The certificate files for ``domain``, with a self-signed placeholder (same key
    as every later certificate) when there is no certificate for it yet."""
    cert_file, key_file = acme_files(data_dir)
    key_pem = key_pem_of(key_file)
    try:
        leaf = load_leaf(cert_file)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if key_pem and domain in san.get_values_for_type(x509.DNSName):
            return cert_file, key_file
    except (TlsError, x509.ExtensionNotFound, ValueError):
        pass  # missing, unreadable or for another name: a fresh placeholder
    if key_pem is None:
        key_pem = new_key_pem().decode()
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    write_pair(cert_file, key_file, self_signed_pem(key, [domain], 90), key_pem)
    return cert_file, key_file


class _Responder:
    """HTTP-01 responses: on Control's own listener and on every gateway."""

    def __init__(
        self,
        store: ChallengeStore,
        publish: Callable[[str, str], Awaitable[None]] | None,
        withdraw: Callable[[str], Awaitable[None]] | None,
    ) -> None:
        self.store = store
        self._publish = publish
        self._withdraw = withdraw

    async def publish(self, token: str, validation: str) -> None:
        self.store.put(token, validation)
        if self._publish is not None:
            await self._publish(token, validation)

    async def withdraw(self, token: str) -> None:
        self.store.discard(token)
        if self._withdraw is not None:
            await self._withdraw(token)


class ControlAcme:
    """Obtains, renews and installs Control's own certificate (module docstring)."""

    def __init__(
        self,
        domain: str,
        directory_url: str,
        data_dir: Path,
        tls: ControlTls,
        *,
        email: str | None = None,
        ca_file: str | None = None,
        http_host: str = "0.0.0.0",
        http_port: int = 80,
        https_port: int = 443,
        renew_before: float = RENEW_BEFORE,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.domain = domain
        self.tls = tls
        self.data_dir = data_dir
        self.http_host = http_host
        self.http_port = http_port
        self.https_port = https_port
        self.renew_before = renew_before
        self.check_interval = check_interval
        self.challenges = ChallengeStore()
        self.client = AcmeClient(
            directory_url,
            data_dir / "acme",
            email=email,
            verify=ca_file or True,
            user_agent="kakuremichi-control",
        )
        #: gateways answer too (set by the app: the hub's coordinator)
        self.publish: Callable[[str, str], Awaitable[None]] | None = None
        self.withdraw: Callable[[str], Awaitable[None]] | None = None
        self.obtained = 0
        self.last_error = ""
        self._server: asyncio.Server | None = None

    # -- the plain-HTTP listener ----------------------------------------------------------

    async def start_listener(self) -> None:
        if not self.http_port:
            return
        try:
            self._server = await asyncio.start_server(
                self._serve_http, self.http_host, self.http_port
            )
        except OSError as exc:
            log.error(
                "cannot listen for ACME http-01 challenges; only gateways can answer them "
                "(use --acme-http-port, or give the process CAP_NET_BIND_SERVICE for 80)",
                extra=kv(host=self.http_host, port=self.http_port, error=exc.strerror),
            )

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            path = parts[1] if len(parts) == 3 else ""
            body = self.challenges.respond(path) if parts[0] in ("GET", "HEAD") else None
            if body is not None:
                payload = body.encode()
                status, extra = "200 OK", b"Content-Type: text/plain\r\n"
            else:
                port = "" if self.https_port == 443 else f":{self.https_port}"
                target = path if path.startswith("/") else "/"
                location = f"https://{self.domain}{port}{target}"
                payload = b""
                status, extra = "308 Permanent Redirect", f"Location: {location}\r\n".encode()
            writer.write(
                f"HTTP/1.1 {status}\r\n".encode()
                + extra
                + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + (payload if parts[0] != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    # -- orders ---------------------------------------------------------------------------

    def due(self, now: float) -> bool:
        """Whether the installed certificate must be replaced: not the CA's yet (self-
        signed placeholder), or expiring within ``renew_before``."""
        try:
            leaf = load_leaf(self.tls.cert_file)
        except TlsError:
            return True
        if leaf.issuer == leaf.subject:
            return True
        return leaf.not_valid_after_utc.timestamp() - now < self.renew_before

    async def renew(self) -> None:
        """Order, install and reload now (:class:`AcmeFailure` on failure)."""
        key = key_pem_of(self.tls.key_file)
        responder = _Responder(self.challenges, self.publish, self.withdraw)
        issued = await self.client.obtain(
            [self.domain], key_pem=key.encode() if key else None, http01=responder
        )
        write_pair(self.tls.cert_file, self.tls.key_file, issued.chain_pem, issued.key_pem)
        self.tls.reload_if_changed()
        self.obtained += 1
        log.info(
            "control's certificate installed",
            extra=kv(
                domain=self.domain,
                not_after=dt.datetime.fromtimestamp(issued.not_after, dt.UTC).isoformat(),
            ),
        )

    async def run(self) -> None:
        """Keep Control's certificate current, forever (cancel to stop)."""
        await self.start_listener()
        delay = BACKOFF_FIRST
        try:
            while True:
                if self.due(time.time()):
                    try:
                        await self.renew()
                        self.last_error = ""
                        delay = BACKOFF_FIRST
                    except AcmeFailure as exc:
                        self.last_error = str(exc)[:300]
                        log.error(
                            "control's certificate order failed; the current one keeps serving",
                            extra=kv(domain=self.domain, error=self.last_error, retry_in_s=delay),
                        )
                        await asyncio.sleep(delay)
                        delay = min(BACKOFF_MAX, delay * 2)
                        continue
                await asyncio.sleep(self._sleep_for())
        finally:
            if self._server is not None:
                self._server.close()
                with contextlib.suppress(Exception):
                    await self._server.wait_closed()

    def _sleep_for(self) -> float:
        left = self.tls.not_after - time.time() - self.renew_before
        return max(1.0, min(self.check_interval, left))
