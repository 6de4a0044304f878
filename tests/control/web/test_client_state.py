"""The dashboard's enable/disable buttons for agents and gateways: CSRF-checked like the
tunnel's, the state shown on the lists, the client's page and its tunnels, the hub
told (a connected client closed with 4008), and audit log entries."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from common import protocol
from tests.control.web.test_pages import client, csrf_of, sign_up
from tests.controlserver import RunningControl, connect_client


async def test_disable_and_enable_agents_and_gateways_from_the_dashboard(
    control: RunningControl,
) -> None:
    async with client(control) as browser, control.api() as api:
        await sign_up(control, browser)
        agent = (await api.post("/api/agents", json={"name": "laptop"})).json()
        gateway = (await api.post("/api/gateways", json={"name": "edge"})).json()
        tunnel = (
            await api.post(
                "/api/tunnels",
                json={"domain": "app.example.com", "target": "127.0.0.1:80", "agent": "laptop"},
            )
        ).json()
        peer = await connect_client(control, agent["apiKey"], "agent", 2)
        page = await browser.get(f"/agents/{agent['id']}")
        assert f'action="/agents/{agent["id"]}/disable"' in page.text
        assert f'action="/agents/{agent["id"]}/enable"' not in page.text
        # without the form's CSRF token: refused, nothing changes
        refused = await browser.post(f"/agents/{agent['id']}/disable", data={"go": "1"})
        assert refused.status_code == 403
        refused = await browser.post(f"/agents/{agent['id']}/disable", data={"csrf": "x"})
        assert refused.status_code == 403
        assert (await api.get("/api/agents/laptop")).json()["enabled"] is True
        # with it: disabled, the connected agent closed with 4008
        done = await browser.post(
            f"/agents/{agent['id']}/disable", data={"csrf": csrf_of(page.text)}
        )
        assert done.status_code == 303
        assert done.headers["location"] == f"/agents/{agent['id']}?notice=disabled"
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(5):
                while True:
                    await peer.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == protocol.CLOSE_DISABLED
        assert (await api.get("/api/agents/laptop")).json()["enabled"] is False
        page = await browser.get(done.headers["location"])
        assert "Disabled." in page.text and 'class="badge disabled"' in page.text
        assert f'action="/agents/{agent["id"]}/enable"' in page.text
        assert "Its key still works" in page.text
        # the list shows it, and its tunnel says why it is not served
        listing = await browser.get("/agents")
        row = next(line for line in listing.text.splitlines() if ">laptop</a>" in line)
        assert ">disabled</span>" in row
        tunnels = await browser.get("/tunnels")
        assert "agent disabled" in tunnels.text
        detail = await browser.get(f"/tunnels/{tunnel['id']}")
        assert "agent disabled" in detail.text
        # enabled again
        done = await browser.post(
            f"/agents/{agent['id']}/enable", data={"csrf": csrf_of(page.text)}
        )
        assert done.status_code == 303
        assert (await api.get("/api/agents/laptop")).json()["enabled"] is True
        assert "agent disabled" not in (await browser.get("/tunnels")).text
        # the same for a gateway
        page = await browser.get(f"/gateways/{gateway['id']}")
        done = await browser.post(
            f"/gateways/{gateway['id']}/disable", data={"csrf": csrf_of(page.text)}
        )
        assert done.status_code == 303
        gateways = await browser.get("/gateways")
        assert ">disabled</span>" in next(
            line for line in gateways.text.splitlines() if ">edge</a>" in line
        )
        refused = await browser.post(f"/gateways/{gateway['id']}/enable", data={"go": "1"})
        assert refused.status_code == 403
        done = await browser.post(
            f"/gateways/{gateway['id']}/enable", data={"csrf": csrf_of(gateways.text)}
        )
        assert done.status_code == 303
        assert (await api.get("/api/gateways/edge")).json()["enabled"] is True
        # an unknown client is a 404 page, not a 500
        missing = await browser.post(
            "/agents/nobody/disable", data={"csrf": csrf_of(gateways.text)}
        )
        assert missing.status_code == 404
        # every change is in the audit log with its actor, and on the client's page
        audit = await browser.get("/audit")
        for action in ("agent.disable", "agent.enable", "gateway.disable", "gateway.enable"):
            assert action in audit.text, action
        history = await browser.get(f"/agents/{agent['id']}")
        assert "agent.disable" in history.text and "alice" in history.text
