"""Draining a replica from the tunnel's page: a Drain (Undrain) button per replica of a
tunnel that has several, the same store and hub steps as the REST drain (the gateways
hear it), an audit entry in the signed-in user's name, CSRF, and clear refusals."""

from __future__ import annotations

import re
from typing import Any

from common import protocol
from tests.control.web.test_pages import client, csrf_of, sign_up
from tests.controlserver import RunningControl, connect_client, create

TWO = [{"agent": "a"}, {"agent": "b"}]


async def _replicated(control: RunningControl) -> tuple[dict[str, Any], dict[str, str]]:
    """Agents a, b and c; a tunnel served by a and b.  Returns it and the agents' ids."""
    ids: dict[str, str] = {}
    async with control.api() as api:
        for name in ("a", "b", "c"):
            ids[name] = (await create(api, "agent", name))["id"]
        made = await api.post(
            "/api/tunnels",
            json={"domain": "app.example.com", "target": "127.0.0.1:8080", "replicas": TWO},
        )
        assert made.status_code == 201, made.text
    return made.json(), ids


async def _states(control: RunningControl, tunnel_id: str) -> dict[str, str]:
    async with control.api() as api:
        shown = (await api.get(f"/api/tunnels/{tunnel_id}")).json()
    return {r["agentName"]: r["state"] for r in shown["replicas"]}


def _buttons(html: str) -> dict[str, str]:
    """The replica buttons on a tunnel page: aria-label -> the form's action."""
    found = re.findall(
        r'<form class="inline" method="post" action="([^"]+/(?:un)?drain)">'
        r'<input type="hidden" name="csrf" value="[^"]+">'
        r'<button[^>]*type="submit" aria-label="([^"]+)">(Drain|Undrain)</button>',
        html,
    )
    for _, label, text in found:
        assert label.startswith(text + " replica ")  # the visible text is in the name
    return {label: action for action, label, _ in found}


async def test_drain_and_undrain_a_replica(control: RunningControl) -> None:
    tunnel, ids = await _replicated(control)
    path = f"/tunnels/{tunnel['id']}"
    async with client(control) as browser:
        await sign_up(control, browser)
        page = await browser.get(path)
        assert page.status_code == 200
        assert _buttons(page.text) == {
            "Drain replica a": f"{path}/replicas/{ids['a']}/drain",
            "Drain replica b": f"{path}/replicas/{ids['b']}/drain",
        }
        drained = await browser.post(
            f"{path}/replicas/{ids['b']}/drain", data={"csrf": csrf_of(page.text)}
        )
        assert drained.status_code == 303
        assert drained.headers["location"] == f"{path}?notice=drained"
        assert await _states(control, tunnel["id"]) == {"a": "unknown", "b": "draining"}
        page = await browser.get(drained.headers["location"])
        assert 'role="status">Draining: that agent gets no new requests' in page.text
        assert 'data-replica-state="draining">draining</td>' in page.text
        assert _buttons(page.text) == {
            "Drain replica a": f"{path}/replicas/{ids['a']}/drain",
            "Undrain replica b": f"{path}/replicas/{ids['b']}/undrain",
        }
        rows, _ = await control.app.state.dashboard.admins.audit(50, 0)
        entry = rows[0]
        assert (entry["actor_kind"], entry["actor"], entry["action"]) == (
            "user",
            "alice",
            "tunnel.drain",
        )
        assert entry["object_id"] == tunnel["id"] and entry["detail"] == "replica b"
        assert "tunnel.drain" in page.text  # the tunnel's own history shows it

        # draining again changes nothing and records nothing
        again = await browser.post(
            f"{path}/replicas/{ids['b']}/drain", data={"csrf": csrf_of(page.text)}
        )
        assert again.status_code == 303
        assert len((await control.app.state.dashboard.admins.audit(50, 0))[0]) == len(rows)

        undrained = await browser.post(
            f"{path}/replicas/{ids['b']}/undrain", data={"csrf": csrf_of(page.text)}
        )
        assert undrained.status_code == 303
        assert undrained.headers["location"] == f"{path}?notice=undrained"
        assert await _states(control, tunnel["id"]) == {"a": "unknown", "b": "unknown"}
        page = await browser.get(undrained.headers["location"])
        assert "Undrain" not in page.text and "That agent takes traffic again." in page.text
        rows, _ = await control.app.state.dashboard.admins.audit(50, 0)
        assert (rows[0]["actor"], rows[0]["action"], rows[0]["detail"]) == (
            "alice",
            "tunnel.undrain",
            "replica b",
        )


async def test_the_gateways_hear_a_drain_made_on_the_page(control: RunningControl) -> None:
    tunnel, ids = await _replicated(control)
    async with control.api() as api:
        gateway = await create(api, "gateway", "edge")
    peer = await connect_client(control, gateway["apiKey"], "gateway", 3)
    try:
        async with client(control) as browser:
            await sign_up(control, browser)
            page = await browser.get(f"/tunnels/{tunnel['id']}")
            drained = await browser.post(
                f"/tunnels/{tunnel['id']}/replicas/{ids['b']}/drain",
                data={"csrf": csrf_of(page.text)},
            )
            assert drained.status_code == 303
        spec = protocol.parse_tunnel((await peer.expect("tunnel_update"))["data"])
        assert {r.agent_id: r.draining for r in spec.replicas} == {ids["a"]: False, ids["b"]: True}
    finally:
        await peer.close()


async def test_a_rest_drain_is_named_as_the_pages(control: RunningControl) -> None:
    tunnel, _ = await _replicated(control)
    async with control.api() as api:
        url = f"/api/tunnels/{tunnel['id']}/replicas/b"
        assert (await api.post(f"{url}/drain")).status_code == 200
        assert (await api.post(f"{url}/undrain")).status_code == 200
    rows, _ = await control.app.state.dashboard.admins.audit(2, 0)
    assert [(r["actor"], r["action"], r["object_id"]) for r in rows] == [
        ("admin-token", "tunnel.undrain", tunnel["id"]),
        ("admin-token", "tunnel.drain", tunnel["id"]),
    ]


async def test_drain_without_the_csrf_token_is_refused(control: RunningControl) -> None:
    tunnel, ids = await _replicated(control)
    action = f"/tunnels/{tunnel['id']}/replicas/{ids['b']}/drain"
    async with client(control) as browser:
        await sign_up(control, browser)
        csrf = csrf_of((await browser.get(f"/tunnels/{tunnel['id']}")).text)
        assert (await browser.post(action, data={"note": "no token"})).status_code == 403
        assert (await browser.post(action, data={"csrf": "x" + csrf})).status_code == 403
        evil = await browser.post(
            action, data={"csrf": csrf}, headers={"Origin": "https://evil.example"}
        )
        assert evil.status_code == 403
    async with client(control) as stranger:  # not signed in
        assert (await stranger.post(action, data={"csrf": csrf})).status_code == 401
    assert await _states(control, tunnel["id"]) == {"a": "unknown", "b": "unknown"}
    rows, _ = await control.app.state.dashboard.admins.audit(50, 0)
    assert not [r for r in rows if r["action"] == "tunnel.drain"]


async def test_unknown_agents_and_non_replicas_are_refused(control: RunningControl) -> None:
    tunnel, ids = await _replicated(control)
    path = f"/tunnels/{tunnel['id']}"
    async with client(control) as browser:
        await sign_up(control, browser)
        csrf = csrf_of((await browser.get(path)).text)

        async def refused(action: str, status: int, says: str) -> None:
            response = await browser.post(action, data={"csrf": csrf})
            assert response.status_code == status, response.text[:500]
            assert "<h1>Not done</h1>" in response.text
            assert says in response.text, response.text[:2000]

        await refused(f"{path}/replicas/nobody/drain", 404, "no agent with id or name")
        await refused(f"{path}/replicas/{ids['c']}/drain", 404, "is not a replica of this tunnel")
        await refused(f"{path}/replicas/{ids['c']}/undrain", 404, "is not a replica")
        missing = "/tunnels/00000000-0000-4000-8000-000000000000"
        response = await browser.post(f"{missing}/replicas/{ids['a']}/drain", data={"csrf": csrf})
        assert response.status_code == 404
    assert await _states(control, tunnel["id"]) == {"a": "unknown", "b": "unknown"}


async def test_a_tunnel_with_one_agent_has_no_drain_button(control: RunningControl) -> None:
    async with control.api() as api:
        agent = await create(api, "agent", "solo")
        single = (
            await api.post(
                "/api/tunnels",
                json={"domain": "one.example.com", "target": "127.0.0.1:1", "agent": "solo"},
            )
        ).json()
    async with client(control) as browser:
        await sign_up(control, browser)
        page = await browser.get(f"/tunnels/{single['id']}")
        assert page.status_code == 200
        assert _buttons(page.text) == {} and "/drain" not in page.text
        assert "Replicas" not in page.text
        # posted anyway: the store's refusal, shown as a page, not a 5xx
        response = await browser.post(
            f"/tunnels/{single['id']}/replicas/{agent['id']}/drain",
            data={"csrf": csrf_of(page.text)},
        )
        assert response.status_code == 409 and "one agent" in response.text
