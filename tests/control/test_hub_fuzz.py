"""The hub-frame fuzzer: random frames and mutations of every valid frame a gateway and
an agent send, fed to the hub.

The bulk (``KAKUREMICHI_HUB_FUZZ_FRAMES``, default 100,000 of each kind) goes straight
to the hub's message handlers (``Hub.authenticate_message`` for a first frame,
``Hub.handle_message`` after it: what the read loops call for every ASGI message),
in-process, on a real app and SQLite database.  A smaller number
(``KAKUREMICHI_HUB_FUZZ_SOCKET_FRAMES``, default 2,000) goes through real WebSocket
connections to a real uvicorn server.  Either way: no exception out of the handler, no
1011, no traceback or error in the logs, one ``error`` frame with a known code per bad
frame, the session open while within its bad-frame allowance, and valid frames still
working afterwards.  ``KAKUREMICHI_HUB_FUZZ_SEED`` replays a run (the seed is printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.websockets import WebSocketState
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from common import protocol as p
from common.logs import JsonFormatter, LogfmtFormatter
from control.app import ControlSettings, create_app
from control.ws.hub import BAD_FRAME_BURST, Connection, Hub
from tests.control.hubfuzz import ValidFrames, mutate, random_frame
from tests.control.test_api import _self_signed
from tests.controlserver import ADMIN_TOKEN, Peer, RunningControl, connect_client, public_key

FRAMES = int(os.environ.get("KAKUREMICHI_HUB_FUZZ_FRAMES", "100000"))
SOCKET_FRAMES = int(os.environ.get("KAKUREMICHI_HUB_FUZZ_SOCKET_FRAMES", "2000"))
DOMAIN = "app.example.com"
#: every code an ``error`` or ``auth_error`` frame may carry
KNOWN_CODES = {
    "auth_required",
    "binary_frame",
    "frame_too_large",
    "invalid_certificate",
    "invalid_field",
    "invalid_key",
    "malformed_frame",
    "malformed_json",
    "unexpected_type",
    "unknown_domain",
    "unknown_type",
}
#: an error message never carries much of the input back
MAX_ERROR_MESSAGE = 1024


@pytest.fixture(scope="module")
def seed() -> int:
    value = int(
        os.environ.get("KAKUREMICHI_HUB_FUZZ_SEED") or random.SystemRandom().randrange(2**32)
    )
    print(f"\nhub fuzz seed: KAKUREMICHI_HUB_FUZZ_SEED={value}")
    return value


class LogWatch(logging.Handler):
    """Formats every record as Control writes it (logfmt and JSON, UTF-8) and keeps any
    line that holds a traceback, an error, or cannot be written."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: Counter[str] = Counter()
        self.problems: list[str] = []
        self._formatters = (LogfmtFormatter(), JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.messages[record.getMessage()] += 1
        for formatter in self._formatters:
            try:
                line = formatter.format(record)
                line.encode("utf-8")
            except Exception as exc:
                self.problems.append(f"cannot write {record.getMessage()!r}: {exc!r}")
                continue
            if "Traceback" in line or record.levelno >= logging.ERROR or record.exc_info:
                self.problems.append(line[:3000])

    def __enter__(self) -> LogWatch:
        root = logging.getLogger()
        self._level = root.level
        root.addHandler(self)
        root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._level)


def _message(raw: str | bytes) -> dict[str, Any]:
    """The ASGI message the WebSocket layer hands the hub for one frame."""
    if isinstance(raw, bytes):
        return {"type": "websocket.receive", "bytes": raw}
    return {"type": "websocket.receive", "text": raw}


def _check_reply(reply: dict[str, Any], raw: str | bytes, seed: int) -> str:
    assert reply["type"] in ("error", "auth_error"), reply
    code = reply["data"]["code"]
    message = reply["data"]["message"]
    where = f"seed {seed}, frame {raw[:200]!r}"
    assert code in KNOWN_CODES, (code, where)
    assert isinstance(message, str) and 0 < len(message) <= MAX_ERROR_MESSAGE, (message, where)
    return str(code)


# -- in-process ------------------------------------------------------------------------


def _greeting(conn: Connection) -> None:
    """A newly authenticated client is sent auth_success and its config, then possibly
    the configs of a coalesced peer push (an earlier accepted auth that changed a key
    schedules one, which may land on this client while it authenticates)."""
    types = [f["type"] for f in _drain(conn)]
    assert types[:2] == ["auth_success", "config"], types
    assert all(t == "config" for t in types[2:]), types


def _drain(conn: Connection) -> list[dict[str, Any]]:
    """The frames queued for a client (JSON, or the check fails)."""
    frames = []
    while not conn.queue.empty():
        text = conn.queue.get_nowait()
        if text is not None:
            frames.append(json.loads(text))
    return frames


class FakeSocket:
    """Stands in for Starlette's WebSocket: records what the hub sends and its close."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: tuple[int, str | None] | None = None
        self.application_state = WebSocketState.CONNECTED
        self.client = None
        self.scope: dict[str, Any] = {}

    async def send_text(self, text: str) -> None:
        self.sent.append(text)  # take() checks it is JSON

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)
        self.application_state = WebSocketState.DISCONNECTED

    async def receive(self) -> dict[str, Any]:
        raise AssertionError("the in-process driver never reads")

    def take(self) -> list[dict[str, Any]]:
        frames = [json.loads(t) for t in self.sent]
        self.sent.clear()
        return frames


@dataclass
class InProcess:
    """A real app and database, its hub, and one authenticated session per kind."""

    hub: Hub
    seed: int
    valid: dict[str, ValidFrames]
    sessions: dict[str, Connection] = field(default_factory=dict)
    session_frames: dict[str, dict[str, Any]] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)

    async def login(self, kind: str) -> Connection:
        conn = await self._first(FakeSocket(), json.dumps(self.session_frames[kind]))
        assert conn is not None
        _greeting(conn)
        self.sessions[kind] = conn
        return conn

    async def _first(self, ws: FakeSocket, raw: str | bytes) -> Connection | None:
        try:
            conn = await self.hub.authenticate_message(ws, _message(raw), "fuzz")  # type: ignore[arg-type]
        except Exception as exc:
            raise AssertionError(
                f"seed {self.seed}: {exc!r} from first frame {raw[:300]!r}"
            ) from exc
        if conn is not None and conn.writer is not None:
            # what the writer task would send is read from the queue instead (_drain):
            # no loop turn per frame
            conn.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await conn.writer
        return conn

    async def feed(self, kind: str, raw: str | bytes) -> None:
        """One frame from an authenticated client, through ``Hub.handle_message``."""
        conn = self.sessions[kind]
        ws: FakeSocket = conn.ws  # type: ignore[assignment]
        conn.bad_allowance = BAD_FRAME_BURST  # the allowance is tested over the socket
        try:
            await self.hub.handle_message(conn, _message(raw))  # type: ignore[arg-type]
        except Exception as exc:
            raise AssertionError(f"seed {self.seed}: {exc!r} from frame {raw[:300]!r}") from exc
        assert not conn.closing and ws.closed is None, (ws.closed, self.seed, raw[:300])
        errors = [f for f in _drain(conn) + ws.take() if f["type"] == "error"]
        assert len(errors) <= 1, (errors, self.seed, raw[:300])
        self.outcomes[_check_reply(errors[0], raw, self.seed) if errors else "accepted"] += 1

    async def feed_first(self, raw: str | bytes) -> None:
        """A connection's first frame, through ``Hub.authenticate_message``."""
        ws = FakeSocket()
        conn = await self._first(ws, raw)
        if conn is None:
            frames = ws.take()
            assert ws.closed is not None and ws.closed[0] == p.CLOSE_AUTH_FAILED, ws.closed
            assert len(frames) == 1, frames
            self.outcomes["first:" + _check_reply(frames[0], raw, self.seed)] += 1
        else:
            _greeting(conn)
            await self.hub._close(conn, 1000, "fuzz")
            assert ws.closed == (1000, "fuzz"), ws.closed
            self.outcomes["first:accepted"] += 1

    def valid_frame(self, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
        kind = rng.choice(("agent", "gateway"))
        frames = getattr(self.valid[kind], f"{kind}_frames")(rng)
        name = rng.choice(list(frames))
        return kind, name, frames[name]


async def _objects(api: httpx.AsyncClient) -> dict[str, Any]:
    """The agents, gateways, tunnels and certificate the valid frames refer to."""
    keys = {}
    for kind, name in (
        ("agent", "session-agent"),
        ("gateway", "session-gateway"),
        ("agent", "auth-agent"),
        ("gateway", "auth-gateway"),
        ("agent", "other-agent"),
    ):
        response = await api.post(f"/api/{kind}s", json={"name": name})
        assert response.status_code == 201, response.text
        keys[name] = response.json()["apiKey"]
    tunnel_ids = []
    for domain, agent in (
        (DOMAIN, "session-agent"),
        ("b.example.com", "session-agent"),
        ("c.example.com", "other-agent"),
    ):
        response = await api.post(
            "/api/tunnels", json={"domain": domain, "target": "127.0.0.1:8080", "agent": agent}
        )
        assert response.status_code == 201, response.text
        tunnel_ids.append(response.json()["id"])
    certificate, private_key = _self_signed(DOMAIN)
    return {"keys": keys, "tunnel_ids": tunnel_ids, "cert": (certificate, private_key)}


def _valid_frames(objects: dict[str, Any], version: Any) -> ValidFrames:
    return ValidFrames(
        agent_key=objects["keys"]["auth-agent"],
        gateway_key=objects["keys"]["auth-gateway"],
        tunnel_ids=objects["tunnel_ids"] + ["not-a-tunnel"],
        domain=DOMAIN,
        certificate=objects["cert"][0],
        private_key=objects["cert"][1],
        public_key=public_key(90),
        config_version=version,
    )


def _session_auth(key: str, kind: str) -> dict[str, Any]:
    data: dict[str, Any] = {"apiKey": key, "clientType": kind, "publicKey": public_key(91)}
    if kind == "gateway":
        data |= {"publicIp": "198.51.100.1", "wireguardPort": 51820}
    return {"type": "auth", "data": data}


@pytest.fixture
async def in_process(tmp_path: Path, seed: int) -> AsyncIterator[InProcess]:
    app = create_app(
        ControlSettings(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'control.db'}",
            admin_token=ADMIN_TOKEN,
            announce=lambda _: None,
        )
    )
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://control",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as api:
            objects = await _objects(api)
        hub: Hub = app.state.hub
        harness = InProcess(hub, seed, {})
        harness.valid = {
            kind: _valid_frames(objects, lambda kind=kind: harness.sessions[kind].config_version)
            for kind in ("agent", "gateway")
        }
        harness.session_frames = {
            "agent": _session_auth(objects["keys"]["session-agent"], "agent"),
            "gateway": _session_auth(objects["keys"]["session-gateway"], "gateway"),
        }
        for kind in ("agent", "gateway"):
            await harness.login(kind)
        yield harness
        for conn in list(harness.sessions.values()):
            await hub._close(conn, 1000, "done")


async def _bulk(harness: InProcess, rng: random.Random, mutated: bool) -> None:
    for _ in range(FRAMES):
        if not mutated:
            raw = random_frame(rng)
            roll = rng.random()
            if roll < 0.1:
                await harness.feed_first(raw)
            else:
                await harness.feed("agent" if roll < 0.55 else "gateway", raw)
            continue
        kind, name, frame = harness.valid_frame(rng)
        raw = mutate(rng, frame, max_string=p.MAX_FRAME_BYTES + 1)
        if (name == "auth" and rng.random() < 0.7) or rng.random() < 0.03:
            await harness.feed_first(raw)
        else:
            await harness.feed(kind, raw)


@pytest.mark.slow
@pytest.mark.parametrize("mutated", [False, True], ids=["random", "mutated"])
async def test_in_process_frames_never_break_the_hub(
    in_process: InProcess, seed: int, mutated: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(f"{seed}-{mutated}")
    started = time.monotonic()
    with LogWatch() as logs:
        await _bulk(in_process, rng, mutated)
        await asyncio.sleep(0.2)  # let coalesced pushes and background closes finish
        # valid frames still work on both sessions
        for conn in in_process.sessions.values():
            _drain(conn)
            await in_process.hub.handle_message(
                conn,
                _message(p.encode("heartbeat", {"timestamp": 1.0, "configVersion": 0})),  # type: ignore[arg-type]
            )
            assert [f["type"] for f in _drain(conn)] == ["config"], conn.kind
    elapsed = time.monotonic() - started
    stderr = capsys.readouterr().err
    outcomes = dict(sorted(in_process.outcomes.items()))
    with capsys.disabled():
        print(
            f"\nhub fuzz, {'mutated' if mutated else 'random'} frames in-process, seed {seed}: "
            f"{FRAMES} in {elapsed:.1f}s: {outcomes}"
        )
    assert not logs.problems, (seed, logs.problems[:5])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert set(in_process.hub.connections) == {
        (c.kind, c.client_id) for c in in_process.sessions.values()
    }
    if FRAMES >= 20_000:  # the fuzzer reached every handler, not only the decoder
        reached = set(in_process.outcomes)
        assert {"malformed_json", "malformed_frame", "binary_frame", "unknown_type"} <= reached
        assert {"invalid_field", "unexpected_type", "first:auth_required"} <= reached
        if mutated:
            assert {"frame_too_large", "invalid_certificate", "unknown_domain"} <= reached
            assert {"first:invalid_key", "first:invalid_field", "first:accepted"} <= reached
            assert in_process.outcomes["accepted"] > FRAMES // 100
            assert logs.messages["certificate stored"] > 0
    assert sum(in_process.outcomes.values()) == FRAMES


# -- through a real WebSocket ----------------------------------------------------------

#: strings stay well under a frame's limit in bytes (4 per character at most), so no
#: frame here is refused by the WebSocket layer (1009, tested in test_hub.py)
SOCKET_MAX_STRING = 200_000


@dataclass
class OverSocket:
    """Fuzz frames sent to a real Control: authenticated sessions re-opened before their
    bad-frame allowance runs out, and first frames on connections of their own."""

    control: RunningControl
    seed: int
    session_keys: dict[str, str]
    sessions: dict[str, Peer] = field(default_factory=dict)
    spent: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    sent: int = 0

    async def session(self, kind: str) -> Peer:
        if kind not in self.sessions:
            self.sessions[kind] = await connect_client(
                self.control, self.session_keys[kind], kind, 91, "198.51.100.1"
            )
            self.spent[kind] = 0
        return self.sessions[kind]

    async def end_session(self, kind: str) -> None:
        """Valid frames still work after the bad ones; then a clean close."""
        peer = self.sessions.pop(kind)
        await peer.heartbeat(0)
        await peer.expect("config")
        await peer.close()
        assert peer.ws.close_code == 1000, peer.ws.close_code
        self.closes[1000] += 1

    async def feed(self, kind: str, raw: str | bytes) -> None:
        """One frame, then a sentinel (an unknown type) whose ``error`` marks the end of
        the hub's answer to it."""
        peer = await self.session(kind)
        self.sent += 1
        sentinel = f"sync-{self.sent}"
        where = f"seed {self.seed}, frame {raw[:300]!r}"
        errors = []
        try:
            await peer.ws.send(raw)
            await peer.ws.send(json.dumps({"type": sentinel}))
            while True:
                frame = await peer.recv(10)
                if frame["type"] != "error":
                    continue
                if frame["data"]["message"] == f"unknown frame type {sentinel!r}":
                    break
                errors.append(_check_reply(frame, raw, self.seed))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            raise AssertionError(
                f"{kind} session closed ({code}) within its allowance; {where}"
            ) from exc
        assert len(errors) <= 1, (errors, where)
        self.outcomes[errors[0] if errors else "accepted"] += 1
        self.spent[kind] += len(errors) + 1
        if self.spent[kind] >= BAD_FRAME_BURST - 4:  # refills only add to what is left
            await self.end_session(kind)

    async def feed_first(self, raw: str | bytes) -> None:
        """One frame as the first on a new connection."""
        frames: list[dict[str, Any]] = []
        async with connect(self.control.ws_url, max_size=None) as ws:
            try:
                await ws.send(raw)
                while len(frames) < 2:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                    if frames[0]["type"] != "auth_success":
                        await asyncio.wait_for(ws.recv(), 10)  # only the close may follow
                        raise AssertionError(f"more after {frames[0]}")
            except ConnectionClosed as exc:
                assert exc.rcvd is not None, "closed without a close frame"
                self.closes[exc.rcvd.code] += 1
                assert exc.rcvd.code == p.CLOSE_AUTH_FAILED, (exc.rcvd, raw[:300])
                assert len(frames) == 1, frames
                self.outcomes["first:" + _check_reply(frames[0], raw, self.seed)] += 1
                return
        assert [f["type"] for f in frames] == ["auth_success", "config"], frames
        self.closes[1000] += 1
        self.outcomes["first:accepted"] += 1


@pytest.mark.slow
async def test_frames_over_a_real_websocket(
    control: RunningControl,
    api: httpx.AsyncClient,
    seed: int,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level("INFO")
    objects = await _objects(api)
    run = OverSocket(
        control,
        seed,
        {"agent": objects["keys"]["session-agent"], "gateway": objects["keys"]["session-gateway"]},
    )
    valid = {
        kind: _valid_frames(
            objects, lambda kind=kind: run.sessions[kind].version if kind in run.sessions else 0
        )
        for kind in ("agent", "gateway")
    }
    rng = random.Random(f"{seed}-socket")
    started = time.monotonic()
    for _ in range(SOCKET_FRAMES):
        if rng.random() < 0.5:
            raw = random_frame(rng)
            first = rng.random() < 0.1
            kind = rng.choice(("agent", "gateway"))
        else:
            kind = rng.choice(("agent", "gateway"))
            frames = getattr(valid[kind], f"{kind}_frames")(rng)
            name = rng.choice(list(frames))
            raw = mutate(rng, frames[name], max_string=SOCKET_MAX_STRING)
            first = name == "auth" and rng.random() < 0.5
        assert len(raw if isinstance(raw, bytes) else raw.encode()) <= p.MAX_FRAME_BYTES
        await (run.feed_first(raw) if first else run.feed(kind, raw))
    for kind in list(run.sessions):
        await run.end_session(kind)
    elapsed = time.monotonic() - started
    assert (await api.get("/healthz")).status_code == 200
    with capsys.disabled():
        print(
            f"\nhub fuzz over a WebSocket, seed {seed}: {SOCKET_FRAMES} frames in {elapsed:.1f}s: "
            f"{dict(sorted(run.outcomes.items()))}, closes {dict(run.closes)}"
        )
    assert 1011 not in run.closes
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, (seed, [caplog.text[-3000:]])
    assert "Traceback" not in caplog.text
    assert sum(run.outcomes.values()) == SOCKET_FRAMES
    if SOCKET_FRAMES >= 1000:
        assert {"accepted", "first:accepted", "invalid_field", "malformed_json"} <= set(
            run.outcomes
        )
