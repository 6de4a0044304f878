"""Reconnect storms (issue 19, control/ws/intake.py): a bounded number of connections
authenticating at once, the rest closed with 1013 "retry after N" that the shared
client honours with jitter; API-key look-ups batched; a client given several Control
URLs moves on to the next one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from common import protocol as p
from control.alloc import AddressPlan
from control.db.engine import create_engine, migrate
from control.db.store import Store
from control.ws.intake import MAX_RETRY_AFTER, Admission, KeyLookup
from tests.common.test_controlclient import client_for, wait_for
from tests.controlserver import RunningControl, connect_client, create
from tests.support import free_port


def test_admission_is_bounded_and_names_a_wait() -> None:
    admission = Admission(2)
    assert admission.enter() and admission.enter()
    assert not admission.enter() and admission.refused == 1
    assert admission.retry_after(0.0) == MAX_RETRY_AFTER  # full, nothing finished yet
    admission.leave(0.0)
    admission.leave(0.1)
    assert admission.admitted == 0
    assert admission.retry_after(0.2) == 1  # nothing waiting
    for _ in range(2):
        assert admission.enter()
    # two finished in the last 2 s (1/s), two waiting: about 2 s
    assert admission.retry_after(0.5) == 2
    assert admission.retry_after(10.0) == MAX_RETRY_AFTER  # the rate is old news
    with pytest.raises(ValueError):
        Admission(0)


async def test_key_lookups_are_batched(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
    await migrate(engine)
    try:
        store = Store(engine, AddressPlan("100.64.0.0/16", 24, 100))
        keys = {}
        for i in range(40):
            row, key = await store.create_client("agent" if i % 2 else "gateway", f"c{i}")
            keys[key] = row["id"]
        lookup = KeyLookup(store)
        wanted = [*keys, "agt_unknown", "gtw_unknown"]
        found = await asyncio.gather(
            *(lookup.lookup("agent" if k.startswith("agt_") else "gateway", k) for k in wanted)
        )
        assert [None if r is None else r["id"] for r in found] == [*keys.values(), None, None]
        assert lookup.keys == len(wanted) and lookup.queries <= 4  # not one per key
        twice = await asyncio.gather(*(lookup.lookup("gateway", k) for k in list(keys)[:1] * 2))
        assert twice[0] == twice[1] and twice[0] is not twice[1]  # each caller its own copy
    finally:
        await engine.dispose()


async def test_a_full_queue_says_retry_after_and_the_client_waits(tmp_path: Path) -> None:
    control = await RunningControl(tmp_path / "c.db", auth_queue=1).start()
    try:
        async with control.api() as api:
            agent = await create(api, "agent", "a")
            gateways = [await create(api, "gateway", f"g{i}") for i in range(2)]
        # two authentications finish (the rate a refusal's wait is estimated from) ...
        for i, gateway in enumerate(gateways):
            await (await connect_client(control, gateway["apiKey"], "gateway", i)).close()
        # ... then one connection holds the only place: upgraded, no auth yet
        holder = await connect(control.ws_url)
        refused = await connect(control.ws_url)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(refused.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == p.CLOSE_TRY_AGAIN
        wait = p.parse_retry_after(info.value.rcvd.reason)
        assert wait is not None and 1 <= wait <= MAX_RETRY_AFTER

        # the shared client is turned away too, and waits at least what it was told
        # (its own back-off here is 0.05..0.3 s)
        client = client_for(control.url, agent["apiKey"])
        task = asyncio.create_task(client.run())
        try:
            await wait_for(lambda: "1013" in client.last_error, 5)
            refused_at = time.monotonic()
            await holder.close()
            await asyncio.wait_for(client.connected.wait(), 10 + 2 * wait)
            assert time.monotonic() - refused_at >= wait - 0.05
            assert client.attempts == 2
        finally:
            await client.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await control.stop()


async def test_a_client_moves_on_to_the_next_control_url(tmp_path: Path) -> None:
    control = await RunningControl(tmp_path / "c.db").start()
    try:
        async with control.api() as api:
            agent = await create(api, "agent", "a")
        dead = f"http://127.0.0.1:{free_port()}"  # nobody listens
        client = client_for(f"{dead}, {control.url}", agent["apiKey"])
        assert client.urls == [f"ws://127.0.0.1:{dead.rsplit(':', 1)[1]}/ws", control.ws_url]
        task = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(client.connected.wait(), 10)
            assert client.url == control.ws_url and client.attempts == 2
        finally:
            await client.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await control.stop()
