"""The gateway's part of shared ACME: order what Control leases, serve every token.

Theory of operation
-------------------
Control decides which gateway orders which certificate (``control/acme.py``); this
module is the other end.  After each ``auth`` the gateway says it orders certificates
(``acme_ready``: ``http-01``, and ``dns-01`` with its provider's zones).  Then:

* ``acme_order`` (a lease) starts one order through :class:`~common.acme.AcmeClient`.
  Its HTTP-01 responses are published through Control (:class:`_ControlResponder`):
  served here at once, sent as ``acme_challenge``, and the CA is told to validate only
  after ``acme_published`` says every gateway serves it.  DNS-01 records go through
  the gateway's own provider.  The certificate is used here at once, kept in the state
  directory, and reported (``certificate_obtained``, with the lease); Control stores
  it and pushes it to every gateway.  A failure is reported (``acme_failed``) and
  shown on ``/healthz`` until an order for that domain succeeds.  A certificate that
  could not be reported (Control away) is reported on the next connection.
* ``acme_challenges`` (every pending response, numbered) replaces what the listener
  answers (plus this gateway's own in-flight tokens) and is acknowledged with
  ``acme_challenges_applied``.

A gateway never orders on its own: without Control's lease there is no order, so two
gateways never order one domain at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from common import protocol as p
from common.acme import AcmeClient, AcmeFailure, ChallengeStore
from common.controlclient import ControlClient
from common.health import DEGRADED, OK, PartHealth
from common.logs import kv
from gateway.tls import Certificate

log = logging.getLogger("gateway.acme")

#: seconds to wait for Control to confirm that every gateway serves a token
PUBLISH_TIMEOUT = 30.0


class _ControlResponder:
    """HTTP-01 responses of one order, published through Control."""

    def __init__(self, owner: GatewayAcme, lease: str) -> None:
        self.owner = owner
        self.lease = lease

    async def publish(self, token: str, validation: str) -> None:
        owner = self.owner
        owner.own[token] = validation
        owner.challenges.put(token, validation)
        waiter = asyncio.get_running_loop().create_future()
        owner.waiters[token] = waiter
        try:
            sent = await owner.control.send(
                "acme_challenge", p.AcmeChallenge(self.lease, token, validation).to_wire()
            )
            if not sent:
                raise AcmeFailure("Control is not connected: the other gateways cannot answer")
            try:
                await asyncio.wait_for(waiter, PUBLISH_TIMEOUT)
            except TimeoutError:
                raise AcmeFailure(
                    f"Control did not confirm the http-01 response within {PUBLISH_TIMEOUT:.0f}s"
                ) from None
        finally:
            owner.waiters.pop(token, None)

    async def withdraw(self, token: str) -> None:
        owner = self.owner
        owner.own.pop(token, None)
        if token not in owner.pushed:
            owner.challenges.discard(token)
        await owner.control.send("acme_withdraw", p.AcmeChallenge(self.lease, token).to_wire())


class GatewayAcme:
    """Orders under Control's leases and serves Control's pending tokens."""

    def __init__(
        self,
        client: AcmeClient,
        control: ControlClient,
        challenges: ChallengeStore,
        on_issued: Callable[[Certificate], None],
    ) -> None:
        self.client = client
        self.control = control
        self.challenges = challenges
        self.on_issued = on_issued
        self.own: dict[str, str] = {}  # this gateway's in-flight tokens
        self.pushed: dict[str, str] = {}  # Control's pending set
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.errors: dict[str, str] = {}  # domain → why its last order failed
        self.orders: dict[str, asyncio.Task[None]] = {}  # lease → its order
        #: orders completed here, by domain (tests and logs)
        self.obtained: dict[str, int] = {}
        self._unreported: dict[str, p.CertificateObtained] = {}
        control.handlers.update(
            {
                "acme_order": self._on_order,
                "acme_challenges": self._on_challenges,
                "acme_published": self._on_published,
            }
        )
        control.on_connect = self._announce

    def health(self) -> PartHealth:
        if not self.errors:
            return PartHealth(OK, "no certificate order failing")
        failing = "; ".join(f"{d} ({e})" for d, e in sorted(self.errors.items()))
        return PartHealth(DEGRADED, f"certificate orders failing: {failing}")

    async def _announce(self) -> None:
        for report in list(self._unreported.values()):
            if await self.control.send("certificate_obtained", report.to_wire()):
                self._unreported.pop(report.domain, None)
        dns = self.client.dns01
        ready = p.AcmeReady(self.client.challenge_types, dns.zones if dns is not None else ())
        await self.control.send("acme_ready", ready.to_wire())

    async def _on_challenges(self, frame: p.Frame) -> None:
        pending = p.parse_acme_challenges(frame.data)
        self.pushed = dict(pending.challenges)
        self.challenges.replace({**self.pushed, **self.own})
        await self.control.send("acme_challenges_applied", {"serial": pending.serial})

    async def _on_published(self, frame: p.Frame) -> None:
        published = p.parse_acme_published(frame.data)
        waiter = self.waiters.get(published.token)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _on_order(self, frame: p.Frame) -> None:
        order = p.parse_acme_order(frame.data)
        if order.lease in self.orders:
            return
        task = asyncio.get_running_loop().create_task(self._order(order))
        self.orders[order.lease] = task
        task.add_done_callback(lambda _: self.orders.pop(order.lease, None))

    async def _order(self, order: p.AcmeOrder) -> None:
        log.info("ordering a certificate under Control's lease", extra=kv(domain=order.domain))
        try:
            issued = await self.client.obtain(
                order.names, http01=_ControlResponder(self, order.lease)
            )
        except AcmeFailure as exc:
            self.errors[order.domain] = str(exc)[:200]
            log.error("certificate order failed", extra=kv(domain=order.domain, error=str(exc)))
            await self.control.send(
                "acme_failed", p.AcmeFailed(order.lease, str(exc)[:500]).to_wire()
            )
            return
        self.errors.pop(order.domain, None)
        self.obtained[order.domain] = self.obtained.get(order.domain, 0) + 1
        cert = Certificate(order.domain, issued.chain_pem, issued.key_pem, issued.not_after, "acme")
        self.on_issued(cert)
        report = p.CertificateObtained(
            cert.domain, cert.chain_pem, cert.key_pem, cert.not_after, order.lease
        )
        if not await self.control.send("certificate_obtained", report.to_wire()):
            self._unreported[cert.domain] = report  # sent when Control is back

    async def close(self) -> None:
        for task in list(self.orders.values()):
            task.cancel()
        for task in list(self.orders.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
