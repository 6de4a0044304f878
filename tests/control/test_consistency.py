"""Under concurrent changes, every client's view (its frames applied in order) ends
equal to the database, and versions only grow."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx

from tests.controlserver import Peer, RunningControl, connect_client, create


def apply(frames: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    view: dict[str, dict[str, Any]] = {}
    for frame in frames:
        kind, data = frame["type"], frame["data"]
        if kind == "config":
            view = {t["id"]: t for t in data["tunnels"]}
        elif kind in ("tunnel_create", "tunnel_update"):
            view[data["id"]] = data
        elif kind == "tunnel_delete":
            view.pop(data["id"], None)
    return view


async def drain(peer: Peer, quiet: float = 0.5) -> None:
    try:
        while True:
            await peer.recv(quiet)
    except TimeoutError:
        pass


async def test_views_converge_under_concurrent_changes(
    control: RunningControl, api: httpx.AsyncClient
) -> None:
    rng = random.Random(7)
    await create(api, "agent", "owner")
    gateways = [await create(api, "gateway", f"g{i}") for i in range(8)]
    peers: list[Peer] = []

    async def churn() -> None:
        ids: list[str] = []
        for i in range(60):
            action = rng.random()
            if action < 0.6 or not ids:
                r = await api.post(
                    "/api/tunnels",
                    json={
                        "domain": f"t{i}.example.com",
                        "target": "127.0.0.1:80",
                        "agent": "owner",
                    },
                )
                ids.append(r.json()["id"])
            elif action < 0.8:
                await api.patch(
                    f"/api/tunnels/{rng.choice(ids)}", json={"target": f"127.0.0.1:{i + 1}"}
                )
            else:
                victim = ids.pop(rng.randrange(len(ids)))
                await api.delete(f"/api/tunnels/{victim}")

    async def join(index: int) -> None:
        await asyncio.sleep(rng.random() * 0.5)
        peers.append(
            await connect_client(control, gateways[index]["apiKey"], "gateway", 100 + index)
        )

    await asyncio.gather(churn(), *(join(i) for i in range(8)))
    for peer in peers:
        await drain(peer)
    truth = {
        t["id"]: t for t in (await api.get("/api/tunnels", params={"limit": 500})).json()["items"]
    }
    assert truth
    for peer in peers:
        view = apply(peer.frames)
        assert set(view) == set(truth)
        for tunnel_id, tunnel in view.items():
            assert tunnel["target"] == truth[tunnel_id]["target"]
        versions = [f["configVersion"] for f in peer.frames]
        assert versions == sorted(versions)
        await peer.close()
