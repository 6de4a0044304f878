"""control.acme's AcmeCoordinator alone (no network): which domains need an order
(renewal included), who gets the lease, expiry and failure back-off, the HTTP-01 set
every gateway must confirm before the orderer may validate.  The same paths against
Pebble with real gateways: tests/gateway_core/test_acme_shared.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common import protocol as p
from control.acme import BACKOFF_FIRST, AcmeCoordinator

DAY = 86400.0


class Harness:
    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.gateways = {"g1": "gw-a", "g2": "gw-b"}
        self.tunnels: list[dict[str, Any]] = []
        self.certificates: list[dict[str, Any]] = []
        self.acme = AcmeCoordinator(
            self.send, lambda: dict(self.gateways), self.rows, clock=lambda: self.now
        )

    def send(self, gateway_id: str, type_: str, data: dict[str, Any]) -> bool:
        if gateway_id not in self.gateways:
            return False
        self.sent.append((gateway_id, type_, data))
        return True

    async def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return self.tunnels, self.certificates

    def tunnel(self, domain: str, enabled: bool = True) -> None:
        self.tunnels.append({"domain": domain, "protocol": "http", "enabled": enabled})

    def orders(self) -> list[tuple[str, str]]:
        """(gateway id, domain) of every acme_order sent, then forgotten."""
        found = [(g, d["domain"]) for g, t, d in self.sent if t == "acme_order"]
        self.sent.clear()
        return found


def http_ready(h: Harness, *ids: str) -> None:
    for gateway_id in ids:
        h.acme.ready(gateway_id, h.gateways[gateway_id], p.AcmeReady(("http-01",)))


async def test_one_lease_per_domain_fewest_leases_first_and_renewal() -> None:
    h = Harness()
    http_ready(h, "g1", "g2")
    h.tunnel("a.example.com")
    h.tunnel("b.example.com")
    h.tunnel("off.example.com", enabled=False)
    h.certificates.append({"domain": "b.example.com", "not_after": h.now + 60 * DAY})
    await h.acme.tick()
    assert h.orders() == [("g1", "a.example.com")]  # b is valid for 60 more days
    await h.acme.tick()
    assert h.orders() == []  # the lease is live: never a second order
    # b now expires within renew_before (30 days): renewed, by the gateway holding fewer
    h.certificates[0]["not_after"] = h.now + 10 * DAY
    await h.acme.tick()
    assert h.orders() == [("g2", "b.example.com")]
    lease = h.acme.leases["b.example.com"]
    h.acme.obtained("g2", "b.example.com", lease.id)
    assert "b.example.com" not in h.acme.leases
    assert h.acme.recent[-1]["outcome"] == "obtained"


async def test_gateway_gone_and_expired_leases_move_to_another_gateway() -> None:
    h = Harness()
    http_ready(h, "g1", "g2")
    h.tunnel("a.example.com")
    await h.acme.tick()
    assert h.orders() == [("g1", "a.example.com")]
    # g1's lease runs out (connected but stuck): the order goes to g2, not g1 again
    h.now += h.acme.lease_ttl + 1
    await h.acme.tick()
    assert h.orders() == [("g2", "a.example.com")]
    # g2 disconnects mid-order: g1 takes it over at once
    del h.gateways["g2"]
    h.acme.gateway_gone("g2")
    await h.acme.tick()
    assert h.orders() == [("g1", "a.example.com")]
    assert [e["outcome"] for e in h.acme.recent] == ["expired", "gateway left"]
    assert h.acme.granted["a.example.com"] == 3


async def test_failure_backs_off_then_retries() -> None:
    h = Harness()
    http_ready(h, "g1")
    h.tunnel("a.example.com")
    await h.acme.tick()
    lease = h.acme.leases["a.example.com"]
    h.orders()
    await h.acme.handle("g1", "gw-a", p.Frame("acme_failed", {"lease": lease.id, "error": "nope"}))
    await h.acme.tick()
    assert h.orders() == []  # backing off
    [status] = h.acme.status(h.tunnels, h.certificates)
    assert (status["state"], status["lastError"]) == ("failing", "nope")
    h.now += BACKOFF_FIRST + 1
    await h.acme.tick()
    assert h.orders() == [("g1", "a.example.com")]


async def test_wildcards_need_dns01_for_their_zone_and_cover_names_under_them() -> None:
    h = Harness()
    http_ready(h, "g1")
    h.tunnel("*.apps.example.com")
    h.tunnel("www.apps.example.com")
    await h.acme.tick()
    assert h.orders() == []  # http-01 cannot prove a wildcard; www waits for it
    assert not h.acme.can_prove("*.apps.example.com")
    h.acme.ready("g2", "gw-b", p.AcmeReady(("http-01", "dns-01"), ("other.com",)))
    assert not h.acme.can_prove("*.apps.example.com")
    h.acme.ready("g2", "gw-b", p.AcmeReady(("http-01", "dns-01"), ("example.com",)))
    h.sent.clear()
    await h.acme.tick()
    assert h.orders() == [("g2", "*.apps.example.com")]
    h.certificates.append({"domain": "*.apps.example.com", "not_after": h.now + 80 * DAY})
    h.acme.obtained("g2", "*.apps.example.com", None)
    await h.acme.tick()
    assert h.orders() == []  # www is covered by the wildcard's certificate


async def test_validation_waits_until_every_gateway_serves_the_token() -> None:
    h = Harness()
    http_ready(h, "g1", "g2")
    h.tunnel("a.example.com")
    await h.acme.tick()
    lease = h.acme.leases["a.example.com"]
    h.sent.clear()
    challenge = p.AcmeChallenge(lease.id, "tok", "tok.thumb").to_wire()
    await h.acme.handle("g1", "gw-a", p.Frame("acme_challenge", challenge))
    sets = [(g, d) for g, t, d in h.sent if t == "acme_challenges"]
    assert {g for g, _ in sets} == {"g1", "g2"}
    serial = sets[0][1]["serial"]
    assert sets[0][1]["challenges"] == [{"token": "tok", "keyAuthorization": "tok.thumb"}]
    applied = p.Frame("acme_challenges_applied", {"serial": serial})
    await h.acme.handle("g1", "gw-a", applied)
    assert not [t for _, t, _ in h.sent if t == "acme_published"]  # g2 not yet
    await h.acme.handle("g2", "gw-b", applied)
    assert [(g, t) for g, t, _ in h.sent if t == "acme_published"] == [("g1", "acme_published")]
    assert h.acme.pending() == {"tok": "tok.thumb"}
    # another gateway cannot publish under g1's lease
    with pytest.raises(p.ProtocolError):
        await h.acme.handle("g2", "gw-b", p.Frame("acme_challenge", challenge))
    # the lease ends: its token is gone from every gateway's set
    h.sent.clear()
    h.acme.obtained("g1", "a.example.com", lease.id)
    assert h.acme.pending() == {}
    assert {g for g, t, d in h.sent if t == "acme_challenges" and d["challenges"] == []} == {
        "g1",
        "g2",
    }
    await asyncio.sleep(0)
