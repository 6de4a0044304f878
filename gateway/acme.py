"""ACME (RFC 8555) HTTP-01 certificates for tunnel domains, on the ``acme`` package.

Theory of operation
-------------------
``ChallengeStore`` holds the key authorisations of pending HTTP-01 challenges; the
gateway's plain-HTTP listener answers ``/.well-known/acme-challenge/<token>`` from it
before any routing.  ``AcmeClient.obtain(domain)`` registers (or finds) the account
for a key kept in the state directory (0600), orders a certificate for the domain
with a fresh P-256 key, publishes the challenge, lets the CA validate, finalizes and
returns the full chain.  The ``acme`` package is synchronous, so each order runs in a
worker thread; the event loop keeps serving (including the challenge itself).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import threading
from pathlib import Path

from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from common.logs import kv
from gateway.tls import Certificate

log = logging.getLogger("gateway.acme")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"


class AcmeFailure(Exception):
    """An order failed; the message says at which step and why."""


class ChallengeStore:
    """Pending HTTP-01 responses, token → key authorisation (thread-safe)."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def put(self, token: str, validation: str) -> None:
        with self._lock:
            self._tokens[token] = validation

    def discard(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def respond(self, path: str) -> str | None:
        """The body for a challenge request path, or None if it is not one of ours."""
        if not path.startswith(CHALLENGE_PREFIX):
            return None
        with self._lock:
            return self._tokens.get(path[len(CHALLENGE_PREFIX) :])


def _new_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class AcmeClient:
    """Obtains certificates from one ACME directory with one account key."""

    def __init__(
        self,
        directory_url: str,
        state_dir: Path,
        challenges_store: ChallengeStore,
        email: str | None = None,
        verify: bool | str = True,
        timeout: float = 120.0,
    ) -> None:
        self.directory_url = directory_url
        self.state_dir = state_dir
        self.challenges = challenges_store
        self.email = email
        self.verify = verify
        self.timeout = timeout
        self._client: client.ClientV2 | None = None

    def _account_key(self) -> JWKEC:
        path = self.state_dir / "acme-account.key"
        if not path.exists():
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(_new_key_pem())
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return JWKEC(key=key)

    def _connect(self) -> client.ClientV2:
        if self._client is not None:
            return self._client
        key = self._account_key()
        net = client.ClientNetwork(
            key,
            alg=ES256,
            verify_ssl=self.verify,  # type: ignore[arg-type]
            user_agent="kakuremichi-gateway",
        )
        directory = client.ClientV2.get_directory(self.directory_url, net)
        acme = client.ClientV2(directory, net=net)
        registration = messages.NewRegistration.from_data(
            email=self.email, terms_of_service_agreed=True
        )
        try:
            acme.new_account(registration)
        except errors.ConflictError as exc:  # the key already has an account
            account = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
            net.account = acme.query_registration(account)
        self._client = acme
        return acme

    def _obtain(self, domain: str) -> Certificate:
        acme = self._connect()
        key_pem = _new_key_pem()
        order = acme.new_order(crypto_util.make_csr(key_pem, [domain]))
        published: list[str] = []
        try:
            for authz in order.authorizations:
                for challenge in authz.body.challenges:
                    if isinstance(challenge.chall, challenges.HTTP01):
                        response, validation = challenge.response_and_validation(acme.net.key)
                        token = challenge.chall.encode("token")
                        self.challenges.put(token, validation)
                        published.append(token)
                        acme.answer_challenge(challenge, response)
                        break
                else:
                    raise AcmeFailure(f"{domain}: the CA offered no http-01 challenge")
            deadline = dt.datetime.now() + dt.timedelta(seconds=self.timeout)
            finished = acme.poll_and_finalize(order, deadline)
        except errors.ValidationError as exc:
            details = "; ".join(str(a.body.challenges) for a in exc.failed_authzrs)[:300]
            raise AcmeFailure(f"{domain}: validation failed: {details}") from exc
        except errors.TimeoutError as exc:
            raise AcmeFailure(f"{domain}: the CA did not finish in {self.timeout:.0f}s") from exc
        except (errors.Error, messages.Error) as exc:
            raise AcmeFailure(f"{domain}: {exc}") from exc
        finally:
            for token in published:
                self.challenges.discard(token)
        chain = finished.fullchain_pem
        leaf = x509.load_pem_x509_certificate(chain.encode())
        return Certificate(
            domain, chain, key_pem.decode(), leaf.not_valid_after_utc.timestamp(), "acme"
        )

    async def obtain(self, domain: str) -> Certificate:
        """Order and return a certificate for ``domain`` (raises :class:`AcmeFailure`)."""
        log.info("requesting certificate", extra=kv(domain=domain, directory=self.directory_url))
        try:
            cert = await asyncio.to_thread(self._obtain, domain)
        except AcmeFailure:
            raise
        except Exception as exc:  # network and protocol errors from requests/acme
            raise AcmeFailure(f"{domain}: {type(exc).__name__}: {exc}") from exc
        log.info(
            "certificate obtained",
            extra=kv(
                domain=domain,
                not_after=dt.datetime.fromtimestamp(cert.not_after, dt.UTC).isoformat(),
            ),
        )
        return cert
