"""Reconnect storms (issue 19, control/ws/intake.py): a bounded number of connections
authenticating at once, the rest closed with 1013 "retry after N" that the shared
client honours with jitter; API-key look-ups batched; a client given several Control
URLs moves on to the next one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from control.alloc import AddressPlan
from control.db.engine import create_engine, migrate
from control.db.store import Store
from control.ws.intake import (
    FLOOR_RATE,
    MAX_RETRY_AFTER,
    MIN_SAMPLES,
    RATE_WINDOW,
    Admission,
    KeyLookup,
)
from tests.common.test_controlclient import client_for, wait_for
from tests.controlserver import RunningControl, create
from tests.support import free_port


def test_admission_is_bounded() -> None:
    admission = Admission(2)
    assert admission.enter(0.0) and admission.enter(0.0)
    assert not admission.enter(0.0) and admission.refused == 1
    admission.leave(0.1)
    admission.leave(0.2)
    assert admission.admitted == 0 and admission.enter(0.3)
    with pytest.raises(ValueError):
        Admission(0)
    with pytest.raises(ValueError):
        Admission(1, assumed_rate=0)


def test_a_crowd_at_a_fresh_start_is_spread_at_the_assumed_rate() -> None:
    """Nothing finished yet (a restart): no blanket longest wait, but slots at the
    assumed rate after the admitted ones, so the crowd comes back spread out."""
    admission = Admission(100, assumed_rate=100.0)
    for _ in range(100):
        assert admission.enter(0.0)
    waits = []
    for _ in range(950):
        assert not admission.enter(0.0)
        waits.append(admission.retry_after(0.0))
    # the admitted 100 take 1 s at 100/s; then come 100 refused clients a second
    assert waits == sorted(waits)
    assert waits[0] == 2 and waits[50] == 2 and waits[150] == 3 and waits[-1] == 11
    counts = Counter(waits)
    assert all(99 <= counts[w] <= 101 for w in range(3, 11)), counts


def test_waits_follow_the_measured_rate() -> None:
    admission = Admission(50, assumed_rate=10.0)
    for _ in range(50):
        admission.enter(0.0)
    # 200 finish in the first half second, and are replaced: 400/s measured
    for i in range(200):
        admission.leave(i / 400)
        admission.enter(i / 400)
    assert admission.rate(0.5) == pytest.approx(400.0)
    assert admission.retry_after(0.5) == 1  # 50 admitted at 400/s, the slot 0.13 s on
    waits = [admission.retry_after(0.5) for _ in range(1200)]
    assert waits[-1] == 4  # 1250 ahead of it at 400/s
    # remembered for the next storm, when nothing finished lately
    assert admission.rate(100.0) == pytest.approx(400.0)


def test_a_stall_never_sends_a_crowd_away_for_the_longest_wait() -> None:
    """The old estimate answered MAX_RETRY_AFTER whenever nothing finished in the last
    RATE_WINDOW while the queue was full; now a stall is planned at the last rate
    measured, and a slow one at FLOOR_RATE at worst."""
    admission = Admission(10, assumed_rate=1.0)
    for _ in range(10):
        admission.enter(0.0)
    for i in range(MIN_SAMPLES):  # a slow patch: MIN_SAMPLES in RATE_WINDOW
        admission.leave(0.2 * i)
        admission.enter(0.2 * i)
    assert admission.rate(RATE_WINDOW) == FLOOR_RATE
    assert admission.retry_after(RATE_WINDOW) == 1  # 10 at the floor rate: 0.2 s
    # nothing finished for a while: the remembered rate, not 30 s
    assert admission.rate(60.0) == FLOOR_RATE
    waits = [admission.retry_after(60.0) for _ in range(100)]
    assert waits[0] == 1 and waits[-1] == 3


def test_the_schedule_moves_with_the_clock_and_is_capped() -> None:
    admission = Admission(1, assumed_rate=FLOOR_RATE)
    admission.enter(0.0)
    waits = [admission.retry_after(0.0) for _ in range(int(FLOOR_RATE) * MAX_RETRY_AFTER * 2)]
    assert waits[-1] == MAX_RETRY_AFTER and waits.count(MAX_RETRY_AFTER) > FLOOR_RATE
    # later refusals are slotted after those already told to come back (the schedule
    # reaches MAX_RETRY_AFTER from when it was made, no further) ...
    assert admission.retry_after(10.0) == MAX_RETRY_AFTER - 10 + 1
    # ... and once those slots have passed, the schedule starts again from now
    assert admission.retry_after(100.0) == 1


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
        # one connection holds the only place: upgraded, no auth yet
        holder = await connect(control.ws_url)
        # the next is refused before the upgrade: 503 and the seconds to wait
        with pytest.raises(InvalidStatus) as info:
            await connect(control.ws_url)
        assert info.value.response.status_code == 503
        wait = int(info.value.response.headers["Retry-After"])
        assert 1 <= wait <= MAX_RETRY_AFTER

        # the shared client is turned away too, and waits at least what it was told
        # (its own back-off here is 0.05..0.3 s)
        client = client_for(control.url, agent["apiKey"])
        task = asyncio.create_task(client.run())
        try:
            await wait_for(lambda: "503" in client.last_error, 5)
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
