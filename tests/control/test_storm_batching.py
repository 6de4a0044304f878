"""Reconnect storms (issue 19): what a crowd of connections costs Control's database —
``auth`` reports written many clients per transaction, replicas' presence stored for
many agents per query — and the cheap refusal of a connection the full
authentication queue cannot take."""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from common import protocol as p
from common.controlclient import ControlClient, ControlClientSettings
from control.alloc import AddressPlan
from control.db.engine import create_engine, migrate
from control.db.store import Store, auth_changes
from control.ws import intake
from control.ws.admission import address_key
from control.ws.hub import Hub

KEY_A = "A" * 43 + "="
KEY_B = "B" * 43 + "="


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'storm.db'}")
    await migrate(engine)
    try:
        yield Store(engine, AddressPlan("100.64.0.0/16", 24, 100))
    finally:
        await engine.dispose()


def _auth(
    kind: str, key: str, version: str, ip: str | None, port: int | None, https: int | None = None
) -> p.Auth:
    return p.Auth("", kind, key, version, ip, port, https)


def test_auth_changes_name_only_what_changed() -> None:
    agent = {"public_key": KEY_A, "client_version": "1.0"}
    assert auth_changes("agent", agent, _auth("agent", KEY_A, "1.0", None, None)) == ({}, False)
    values, peers = auth_changes("agent", agent, _auth("agent", KEY_A, "1.1", None, None))
    assert set(values) == {"client_version", "updated_at"} and not peers
    values, peers = auth_changes("agent", agent, _auth("agent", KEY_B, "1.0", None, None))
    assert set(values) == {"public_key", "updated_at"} and peers
    gateway = {
        "public_key": KEY_A,
        "client_version": "1.0",
        "public_ip": "192.0.2.1",
        "wireguard_port": 51820,
        "https_port": None,
    }
    assert auth_changes("gateway", gateway, _auth("gateway", KEY_A, "1.0", "192.0.2.1", 51820)) == (
        {},
        False,
    )
    values, peers = auth_changes(
        "gateway", gateway, _auth("gateway", KEY_A, "1.0", "192.0.2.9", 51820)
    )
    assert values["public_ip"] == "192.0.2.9" and values["https_port"] is None and peers


async def test_auth_reports_are_written_in_batches(store: Store) -> None:
    rows = []
    for i in range(60):
        row, _key = await store.create_client("agent" if i % 3 else "gateway", f"c{i}")
        rows.append(("agent" if i % 3 else "gateway", row))
    recorder = intake.AuthRecorder(store)
    generation = store.generation

    def report(kind: str, row: dict[str, Any], i: int) -> Any:
        key = f"{i:043d}="
        if kind == "gateway":
            return recorder.record(
                "gateway", row, _auth("gateway", key, "2.0", "192.0.2.7", 51820, 443)
            )
        return recorder.record("agent", row, _auth("agent", key, "2.0", None, None))

    changed = await asyncio.gather(*(report(k, row, i) for i, (k, row) in enumerate(rows)))
    assert all(changed)  # every key is new: every client's peers must hear of it
    assert recorder.rows == 60 and recorder.writes <= 3  # not one transaction each
    assert store.generation > generation  # cached views are stale now
    # ... by clients' own reports only: a row read before is current but for those
    assert store.generation - store.auth_writes == generation
    assert all(row["public_key"] == f"{i:043d}=" for i, (_, row) in enumerate(rows))
    fresh = []
    for i, (kind, row) in enumerate(rows):
        stored = await store.get_client(kind, row["id"])  # type: ignore[arg-type]
        fresh.append((kind, stored))
        assert stored["public_key"] == f"{i:043d}=" and stored["client_version"] == "2.0"
        if kind == "gateway":
            endpoint = (stored["public_ip"], stored["wireguard_port"], stored["https_port"])
            assert endpoint == ("192.0.2.7", 51820, 443)

    # the same again (a reconnect after a restart): nothing to write, no invalidation
    generation, writes = store.generation, recorder.writes
    again = await asyncio.gather(*(report(k, row, i) for i, (k, row) in enumerate(fresh)))
    assert not any(again) and recorder.writes == writes and store.generation == generation

    # only the version changed: written, but no client's peers are affected
    bump = await recorder.record(
        "agent", fresh[1][1], _auth("agent", f"{1:043d}=", "3.0", None, None)
    )
    assert bump is False and store.generation == generation
    assert (await store.get_client("agent", rows[1][1]["id"]))["client_version"] == "3.0"


def fail_once(real: Callable[..., Awaitable[Any]], error: Exception) -> Callable[..., Any]:
    """``real`` whose first call raises ``error`` (a batch's query failing once)."""
    calls = 0

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return await real(*args, **kwargs)

    return failing_once


async def test_a_failed_batch_fails_each_waiter_and_the_next_batch_runs(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [(await store.create_client("agent", f"a{i}"))[0] for i in range(3)]
    recorder = intake.AuthRecorder(store)
    monkeypatch.setattr(store, "record_auths", fail_once(store.record_auths, OSError("disk full")))
    results = await asyncio.gather(
        *(
            recorder.record("agent", r, _auth("agent", f"{i:043d}=", "1", None, None))
            for i, r in enumerate(rows)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(r, OSError) for r in results) and recorder.writes == 0
    assert await recorder.record("agent", rows[0], _auth("agent", KEY_B, "1", None, None)) is True
    assert (await store.get_client("agent", rows[0]["id"]))["public_key"] == KEY_B


async def test_a_failed_key_lookup_fails_each_waiter_and_the_next_one_runs(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [await store.create_client("agent", f"k{i}") for i in range(3)]
    lookup = intake.KeyLookup(store)
    monkeypatch.setattr(
        store,
        "clients_by_key_hashes",
        fail_once(store.clients_by_key_hashes, OSError("database gone")),
    )
    results = await asyncio.gather(
        *(lookup.lookup("agent", key) for _, key in rows), return_exceptions=True
    )
    assert all(isinstance(r, OSError) for r in results) and lookup.queries == 0
    found = await lookup.lookup("agent", rows[0][1])
    assert found is not None and found["id"] == rows[0][0]["id"]


async def test_connections_ending_at_once_are_written_in_batches(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crowd of connections ending: their last-seen times are written many per
    statement, every caller returns once its own row is written, and a failed write
    fails its waiters only (the next batch runs)."""
    agents = [(await store.create_client("agent", f"a{i}"))[0] for i in range(40)]
    gateways = [(await store.create_client("gateway", f"g{i}"))[0] for i in range(10)]
    writer = intake.SeenWriter(store)
    ended = [("agent", a["id"], 1000.0 + i) for i, a in enumerate(agents)]
    ended += [("gateway", g["id"], 2000.0 + i) for i, g in enumerate(gateways)]
    await asyncio.gather(*(writer.touch(kind, i, seen) for kind, i, seen in ended))  # type: ignore[arg-type]
    assert writer.rows == 50 and writer.writes <= 2, (writer.writes, writer.rows)
    for kind, client_id, seen in ended:
        assert (await store.get_client(kind, client_id))["last_seen"] == seen  # type: ignore[arg-type]
    monkeypatch.setattr(store, "touch_many", fail_once(store.touch_many, OSError("disk full")))
    results = await asyncio.gather(
        *(writer.touch("agent", a["id"], 3000.0) for a in agents[:3]), return_exceptions=True
    )
    assert all(isinstance(r, OSError) for r in results), results
    await writer.touch("agent", agents[0]["id"], 4000.0)
    assert (await store.get_client("agent", agents[0]["id"]))["last_seen"] == 4000.0


async def test_replicas_presence_for_many_agents_at_once(store: Store) -> None:
    agents = [(await store.create_client("agent", f"a{i}"))[0] for i in range(6)]
    tunnels = []
    for i in range(3):  # tunnel i served by agents 2i and 2i+1
        tunnels.append(
            await store.create_tunnel(
                {
                    "protocol": "http",
                    "domain": f"t{i}.example.com",
                    "target": "127.0.0.1:80",
                    "replicas": [
                        {"agent": agents[2 * i]["id"]},
                        {"agent": agents[2 * i + 1]["id"]},
                    ],
                }
            )
        )
    everyone = [a["id"] for a in agents]
    # everybody leaves: every tunnel changed, each named once
    gone = await store.set_replica_presence(everyone + everyone[:2], False)
    assert sorted(gone) == sorted(t["id"] for t in tunnels)
    assert await store.set_replica_presence(everyone, False) == []  # offline already
    # the first tunnel's agents come back: only it changes, its replicas are "unknown"
    back = await store.set_replica_presence(everyone[:2], True)
    assert back == [tunnels[0]["id"]]
    row = await store.get_tunnel(tunnels[0]["id"])
    assert {r["health"] for r in row["replicas"]} == {"unknown"}
    row = await store.get_tunnel(tunnels[1]["id"])
    assert {r["health"] for r in row["replicas"]} == {"offline"}


class _PlainWebSocket:
    """A server that cannot answer before the upgrade (no ``websocket.http.response``):
    what the hub does to it is recorded."""

    def __init__(self) -> None:
        self.scope: dict[str, Any] = {"extensions": {}}
        self.calls: list[tuple[str, Any]] = []
        from starlette.websockets import WebSocketState

        self.application_state = WebSocketState.CONNECTING

    async def accept(self) -> None:
        from starlette.websockets import WebSocketState

        self.calls.append(("accept", None))
        self.application_state = WebSocketState.CONNECTED

    async def close(self, code: int, reason: str) -> None:
        from starlette.websockets import WebSocketState

        self.calls.append(("close", (code, reason)))
        self.application_state = WebSocketState.DISCONNECTED


async def test_without_a_response_before_the_upgrade_a_refusal_is_a_1013_close(
    store: Store,
) -> None:
    hub = Hub(store, auth_queue=1)
    assert hub.admission.enter(0.0)
    ws = _PlainWebSocket()
    await hub._refuse_busy(ws)  # type: ignore[arg-type]
    assert ws.calls[0] == ("accept", None)
    kind, (code, reason) = ws.calls[1]
    assert kind == "close" and code == p.CLOSE_TRY_AGAIN
    assert p.parse_retry_after(reason) == 1  # one admitted ahead of it at 500/s


def test_a_refused_client_waits_what_it_was_told_plus_a_little() -> None:
    settings = ControlClientSettings(
        control_url="http://127.0.0.1:1",
        api_key="agt_x",
        client_type="agent",
        public_key=KEY_A,
        version="test",
    )
    client = ControlClient(settings, rng=random.Random(7))
    for told in (1, 4, 30):
        waits = [client.retry_wait(told) for _ in range(500)]
        assert told <= min(waits) and max(waits) <= told + max(1, told / 4)
        assert max(waits) - min(waits) > 0.8 * max(1, told / 4)  # spread over all of it


def test_address_keys_are_cached() -> None:
    address_key.cache_clear()
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("2001:db8::1") == address_key("2001:db8::2")  # one /64
    assert address_key(None) == "?"
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key.cache_info().hits == 1


def test_the_collector_is_relaxed_once() -> None:
    before = gc.get_threshold()
    try:
        intake.relax_gc()
        young, middle, old = gc.get_threshold()
        assert young == intake.GC_YOUNG_THRESHOLD and middle >= 20 and old >= 10
        gc.set_threshold(*before)
        intake.relax_gc()  # once per process: a second hub changes nothing
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)
