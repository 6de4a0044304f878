"""One ACME (RFC 8555) order at a time for one account, on the ``acme`` package.

Theory of operation
-------------------
``AcmeClient.obtain(names)`` registers (or finds) the account for a key kept in the
state directory (``acme-account.key``, 0600), orders one certificate for the names
with a fresh P-256 key (or the key it is given: Control keeps its own so that
enrollment tokens' pins survive a renewal), answers every authorisation, lets the CA
validate, finalizes and returns the full chain.

*Challenges.*  Each authorisation is answered with HTTP-01 when the client has an
:class:`Http01Responder` and the CA offers it; otherwise (always for a wildcard name,
which the CA offers only DNS-01 for) with DNS-01 through the client's
:class:`~common.acme.dns.DnsProvider`.  Every response is published first (the HTTP-01
key authorisation wherever the CA may connect, the DNS-01 TXT record at
``_acme-challenge.<name>``), and only then does the client tell the CA to validate;
whatever was published is withdrawn when the order ends, however it ends.

*Threads.*  The ``acme`` package is synchronous, so each order runs in a worker thread
and the event loop keeps serving (the HTTP-01 answer itself, among others); the
responder's and the provider's coroutines are run on the loop that called
``obtain``.  A failure at any step is an :class:`AcmeFailure` whose message names the
names and the step; no key or token is logged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from common.acme.dns import DnsError, DnsProvider
from common.logs import kv

log = logging.getLogger("kakuremichi.acme")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
#: seconds a responder or provider call may take before the order fails
HOOK_TIMEOUT = 60.0


class AcmeFailure(Exception):
    """An order failed; the message says for which names, at which step and why."""


@dataclass(frozen=True)
class Issued:
    """A certificate an order returned: the names, the full chain, its key, its expiry."""

    names: tuple[str, ...]
    chain_pem: str
    key_pem: str
    not_after: float

    def __repr__(self) -> str:  # never the key
        return f"Issued(names={self.names!r}, not_after={self.not_after})"


class Http01Responder(Protocol):
    """Where HTTP-01 key authorisations are served from while an order needs them.

    ``publish`` returns once the CA may connect (every listener that answers for the
    name has the token); ``withdraw`` once it is gone."""

    async def publish(self, token: str, validation: str) -> None: ...

    async def withdraw(self, token: str) -> None: ...


class ChallengeStore:
    """Pending HTTP-01 responses, token → key authorisation (thread-safe), answered by
    a plain-HTTP listener before any routing."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        #: challenge requests answered (a listener counts; tests read it)
        self.answered = 0

    def put(self, token: str, validation: str) -> None:
        with self._lock:
            self._tokens[token] = validation

    def discard(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def replace(self, tokens: dict[str, str]) -> None:
        """Make the pending set exactly ``tokens`` (what Control says is pending)."""
        with self._lock:
            self._tokens = dict(tokens)

    def tokens(self) -> dict[str, str]:
        with self._lock:
            return dict(self._tokens)

    def respond(self, path: str) -> str | None:
        """The body for a challenge request path, or None if it is not one of ours."""
        if not path.startswith(CHALLENGE_PREFIX):
            return None
        with self._lock:
            answer = self._tokens.get(path[len(CHALLENGE_PREFIX) :])
            if answer is not None:
                self.answered += 1
            return answer


class LocalHttp01:
    """The responder of a program that answers HTTP-01 itself, from one store."""

    def __init__(self, store: ChallengeStore) -> None:
        self.store = store

    async def publish(self, token: str, validation: str) -> None:
        self.store.put(token, validation)

    async def withdraw(self, token: str) -> None:
        self.store.discard(token)


def new_key_pem() -> bytes:
    """A fresh P-256 private key, PKCS#8 PEM."""
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _names(names: Sequence[str]) -> str:
    return ",".join(names)[:200]


class AcmeClient:
    """Obtains certificates from one ACME directory with one account key."""

    def __init__(
        self,
        directory_url: str,
        state_dir: Path,
        *,
        http01: Http01Responder | None = None,
        dns01: DnsProvider | None = None,
        email: str | None = None,
        verify: bool | str = True,
        timeout: float = 120.0,
        user_agent: str = "kakuremichi",
    ) -> None:
        self.directory_url = directory_url
        self.state_dir = state_dir
        self.http01 = http01
        self.dns01 = dns01
        self.email = email
        self.verify = verify
        self.timeout = timeout
        self.user_agent = user_agent
        self._client: client.ClientV2 | None = None
        self._lock = threading.Lock()

    @property
    def challenge_types(self) -> tuple[str, ...]:
        """The challenges this client can answer (``http-01``, ``dns-01``)."""
        return tuple(
            kind for kind, ready in (("http-01", self.http01), ("dns-01", self.dns01)) if ready
        )

    def _account_key(self) -> JWKEC:
        path = self.state_dir / "acme-account.key"
        if not path.exists():
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(new_key_pem())
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeFailure(f"{path} is not a P-256 account key")
        return JWKEC(key=key)

    def _connect(self) -> client.ClientV2:
        if self._client is not None:
            return self._client
        key = self._account_key()
        net = client.ClientNetwork(
            key,
            alg=ES256,
            verify_ssl=self.verify,  # type: ignore[arg-type]
            user_agent=self.user_agent,
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

    def _call(
        self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], what: str
    ) -> None:
        """Run a responder's or provider's coroutine on the caller's loop, from the
        order's thread."""
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            future.result(HOOK_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise AcmeFailure(f"{what} took longer than {HOOK_TIMEOUT:.0f}s") from None
        except DnsError as exc:
            raise AcmeFailure(f"{what}: {exc}") from exc

    def _obtain(
        self,
        loop: asyncio.AbstractEventLoop,
        names: tuple[str, ...],
        key_pem: bytes,
        http01: Http01Responder | None,
    ) -> Issued:
        with self._lock:  # one order at a time per account connection
            acme = self._connect()
            order = acme.new_order(crypto_util.make_csr(key_pem, list(names)))
            tokens: list[str] = []
            records: list[tuple[str, str]] = []
            answers: list[tuple[messages.ChallengeBody, challenges.ChallengeResponse]] = []
            try:
                for authz in order.authorizations:
                    identifier = authz.body.identifier.value
                    offered = {type(c.chall): c for c in authz.body.challenges}
                    http = offered.get(challenges.HTTP01)
                    dns = offered.get(challenges.DNS01)
                    if http is not None and http01 is not None and not authz.body.wildcard:
                        response, validation = http.response_and_validation(acme.net.key)
                        token = http.chall.encode("token")
                        tokens.append(token)
                        self._call(
                            loop,
                            http01.publish(token, validation),
                            f"publishing the http-01 response for {identifier}",
                        )
                        answers.append((http, response))
                    elif dns is not None and self.dns01 is not None:
                        response, validation = dns.response_and_validation(acme.net.key)
                        record = dns.chall.validation_domain_name(identifier)
                        records.append((record, validation))
                        self._call(
                            loop,
                            self.dns01.present(record, validation),
                            f"publishing the dns-01 record {record}",
                        )
                        answers.append((dns, response))
                    else:
                        wildcard = "*." if authz.body.wildcard else ""
                        needs = "dns-01" if authz.body.wildcard else "http-01 or dns-01"
                        raise AcmeFailure(
                            f"{wildcard}{identifier}: needs {needs}; this client answers "
                            f"{', '.join(self.challenge_types) or 'none'}"
                        )
                for challenge, response in answers:
                    acme.answer_challenge(challenge, response)
                deadline = dt.datetime.now() + dt.timedelta(seconds=self.timeout)
                finished = acme.poll_and_finalize(order, deadline)
            finally:
                for token in tokens:
                    assert http01 is not None
                    try:
                        self._call(loop, http01.withdraw(token), "withdrawing a response")
                    except AcmeFailure as exc:
                        log.warning("http-01 response not withdrawn", extra=kv(error=str(exc)))
                for record, value in records:
                    assert self.dns01 is not None
                    try:
                        self._call(loop, self.dns01.cleanup(record, value), f"removing {record}")
                    except AcmeFailure as exc:
                        log.warning("dns-01 record not removed", extra=kv(error=str(exc)))
        chain = finished.fullchain_pem
        leaf = x509.load_pem_x509_certificate(chain.encode())
        return Issued(names, chain, key_pem.decode(), leaf.not_valid_after_utc.timestamp())

    async def obtain(
        self,
        names: Sequence[str],
        key_pem: bytes | None = None,
        http01: Http01Responder | None = None,
    ) -> Issued:
        """Order and return a certificate for ``names`` (raises :class:`AcmeFailure`);
        ``http01`` replaces the client's responder for this order."""
        wanted = tuple(n.lower().rstrip(".") for n in names)
        log.info(
            "requesting certificate",
            extra=kv(names=_names(wanted), directory=self.directory_url),
        )
        loop = asyncio.get_running_loop()
        key = key_pem if key_pem is not None else new_key_pem()
        try:
            issued = await asyncio.to_thread(
                self._obtain, loop, wanted, key, http01 if http01 is not None else self.http01
            )
        except AcmeFailure as exc:
            raise AcmeFailure(f"{_names(wanted)}: {exc}") from exc
        except errors.ValidationError as exc:
            details = "; ".join(
                str(c.error) for a in exc.failed_authzrs for c in a.body.challenges if c.error
            )
            raise AcmeFailure(
                f"{_names(wanted)}: validation failed: {details[:300] or 'no detail'}"
            ) from exc
        except errors.TimeoutError as exc:
            raise AcmeFailure(
                f"{_names(wanted)}: the CA did not finish in {self.timeout:.0f}s"
            ) from exc
        except Exception as exc:  # network and protocol errors from requests/acme
            raise AcmeFailure(f"{_names(wanted)}: {type(exc).__name__}: {exc}"[:400]) from exc
        log.info(
            "certificate obtained",
            extra=kv(
                names=_names(wanted),
                not_after=dt.datetime.fromtimestamp(issued.not_after, dt.UTC).isoformat(),
            ),
        )
        return issued
