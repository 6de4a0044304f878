"""The request-head deadline and the per-address cap on connections without a request
(``control.listener``): a real Control served by ``server_for`` on loopback, driven
with raw TCP sockets, over both of uvicorn's HTTP/1.1 protocols (httptools and h11:
the listener reads their ``cycle``, so a uvicorn that changes it fails here)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from websockets.asyncio.client import connect

from common.config import ConfigError, add_settings, resolve
from control import listener
from control.app import ControlSettings, create_app
from control.main import SETTINGS, _Server, server_for, settings_from
from tests.control.test_lifecycle import _spawn, _wait_ready
from tests.controlserver import ADMIN_TOKEN, public_key
from tests.support import free_port

HEAD_TIMEOUT = 0.5
CAP = 3
EXPIRED_LINE = "closing connection that did not complete a request head in time"
REFUSED_LINE = "refusing connections over the per-address cap on ones without a request"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: control\r\n\r\n"

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Served:
    """Control under ``server_for`` with a short head deadline and a small cap."""

    def __init__(self, server: _Server, port: int) -> None:
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.rules: listener.HeadRules | None = None

    async def open(self, local: str = "127.0.0.1") -> Stream:
        return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(local, 0))


@pytest.fixture(params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Served]:
    app = create_app(
        ControlSettings(
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'control.db'}",
            admin_token=ADMIN_TOKEN,
            announce=lambda text: None,
        )
    )
    port = free_port()
    server = server_for(
        app, "127.0.0.1", port, head_timeout=HEAD_TIMEOUT, pre_request_per_address=CAP
    )
    # what run() serves with, but over the protocol under test
    assert isinstance(server.config.http, type) and issubclass(
        server.config.http, listener.HeadDeadline
    )
    rules = listener.HeadRules(HEAD_TIMEOUT, CAP)
    server.config.http = listener.protocol_class(rules, request.param)
    served = Served(server, port)
    served.rules = rules
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), task
                await asyncio.sleep(0.01)
        yield served
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return int(status_line.split()[1]), headers, body


async def _until_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    data = await asyncio.wait_for(reader.read(), timeout)
    return data, loop.time() - started


def _close(*streams: Stream) -> None:
    for _, writer in streams:
        writer.close()


async def _until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- the deadline ---------------------------------------------------------------------


async def test_a_silent_connection_is_closed_at_the_deadline(served: Served) -> None:
    reader, writer = await served.open()
    data, elapsed = await _until_eof(reader)
    assert data == b""  # nothing was asked, nothing is answered
    assert HEAD_TIMEOUT - 0.1 <= elapsed <= HEAD_TIMEOUT + 2.0
    writer.close()


async def test_a_partial_head_gets_408_at_the_deadline(served: Served) -> None:
    reader, writer = await served.open()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: cont")
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, headers, body = await _response(reader)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert (await _until_eof(reader))[0] == b""
    assert HEAD_TIMEOUT - 0.1 <= loop.time() - started <= HEAD_TIMEOUT + 2.0
    writer.close()


async def test_a_slow_head_within_the_deadline_is_served(served: Served) -> None:
    reader, writer = await served.open()
    step = HEAD_TIMEOUT / 2 / len(HEALTHZ) * 4
    for i in range(0, len(HEALTHZ), 4):  # a few bytes at a time, done in about half of it
        writer.write(HEALTHZ[i : i + 4])
        await asyncio.sleep(step)
    status, _, body = await _response(reader)
    assert status == 200 and json.loads(body)["status"] == "ok"
    # the connection is kept alive past the deadline: it only ever bound the head
    await asyncio.sleep(HEAD_TIMEOUT + 0.2)
    writer.write(HEALTHZ)
    assert (await _response(reader))[0] == 200
    writer.close()


async def test_progress_does_not_extend_the_deadline(served: Served) -> None:
    reader, writer = await served.open()
    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        for byte in HEALTHZ[:-2]:  # a byte every 0.1 s, never the final CRLF
            writer.write(bytes([byte]))
            sent += 1
            await asyncio.sleep(0.1)

    task = loop.create_task(trickle())
    try:
        status, _, _ = await _response(reader)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert status == 408
    assert HEAD_TIMEOUT - 0.1 <= loop.time() - started <= HEAD_TIMEOUT + 2.0
    assert 0 < sent < len(HEALTHZ) - 2  # it was still going
    writer.close()


async def test_a_later_request_has_the_deadline_from_its_first_byte(served: Served) -> None:
    reader, writer = await served.open()
    writer.write(HEALTHZ)
    assert (await _response(reader))[0] == 200
    # idle between requests is the keep-alive timeout's business (5 s), not the deadline's
    await asyncio.sleep(HEAD_TIMEOUT * 2)
    writer.write(HEALTHZ)
    assert (await _response(reader))[0] == 200
    writer.write(HEALTHZ[:20])  # a later head that stalls
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await _response(reader))[0] == 408
    assert HEAD_TIMEOUT - 0.1 <= loop.time() - started <= HEAD_TIMEOUT + 2.0
    writer.close()


async def test_requests_and_the_hub_are_unaffected(served: Served) -> None:
    async with httpx.AsyncClient(
        base_url=served.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ) as api:
        agent = (await api.post("/api/agents", json={"name": "laptop"})).json()
        async with connect(served.url.replace("http", "ws") + "/ws") as ws:
            auth = {"apiKey": agent["apiKey"], "clientType": "agent", "publicKey": public_key(1)}
            await ws.send(json.dumps({"type": "auth", "data": auth}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "auth_success"
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "config"
            # well past the head deadline the WebSocket is still the hub's
            await asyncio.sleep(HEAD_TIMEOUT * 3)
            beat = {"timestamp": 1.0, "configVersion": 0}
            await ws.send(json.dumps({"type": "heartbeat", "data": beat}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "config"
            listed = await api.get("/api/agents")
            assert listed.status_code == 200 and listed.json()["items"][0]["online"] is True
            assert ws.close_code is None
        await ws.wait_closed()
        assert ws.close_code == 1000
    assert served.rules is not None and served.rules.pending.total() == 0


async def test_deadline_closes_are_logged_once_per_address(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="control.listener")
    streams = [await served.open() for _ in range(CAP)]
    for reader, _ in streams:
        assert (await _until_eof(reader))[0] == b""
    other = await served.open("127.0.0.2")
    assert (await _until_eof(other[0]))[0] == b""
    lines = [r for r in caplog.records if r.getMessage() == EXPIRED_LINE]
    fields = [r.fields for r in lines]  # type: ignore[attr-defined]
    assert [f["address"] for f in fields] == ["127.0.0.1", "127.0.0.2"], fields
    assert fields[0]["since_last_logged"] == 0 and fields[0]["partial"] is False
    # the next line for that address carries the count of the ones not logged
    assert served.rules is not None
    served.rules.expired.interval = 0.0
    again = await served.open()
    await _until_eof(again[0])
    last = [r for r in caplog.records if r.getMessage() == EXPIRED_LINE][-1]
    assert last.fields == {  # type: ignore[attr-defined]
        "address": "127.0.0.1",
        "timeout_s": HEAD_TIMEOUT,
        "partial": False,
        "since_last_logged": CAP - 1,
    }
    _close(*streams, other, again)


# -- the cap --------------------------------------------------------------------------


async def test_connections_over_the_cap_get_429_and_are_closed(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="control.listener")
    rules = served.rules
    assert rules is not None
    idle = [await served.open() for _ in range(CAP)]
    await _until(lambda: rules.pending.pending("127.0.0.1") == CAP)
    for _ in range(3):
        reader, writer = await served.open()
        status, headers, body = await _response(reader)
        assert status == 429 and headers["retry-after"] == "5"
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        assert (await _until_eof(reader))[0] == b""
        writer.close()
    lines = [r for r in caplog.records if r.getMessage() == REFUSED_LINE]
    assert [r.fields for r in lines] == [  # type: ignore[attr-defined]
        {"address": "127.0.0.1", "cap": CAP, "refused": 1}
    ]
    # another address has a cap of its own
    reader, writer = await served.open("127.0.0.2")
    writer.write(HEALTHZ)
    assert (await _response(reader))[0] == 200
    writer.close()
    # a pending connection that sends its request gives its slot back
    idle[0][1].write(HEALTHZ)
    assert (await _response(idle[0][0]))[0] == 200
    assert rules.pending.pending("127.0.0.1") == CAP - 1
    reader, writer = await served.open()
    writer.write(HEALTHZ)
    assert (await _response(reader))[0] == 200
    writer.close()
    # and so do the ones closed at the deadline
    _close(idle[0])
    for reader, _ in idle[1:]:
        await _until_eof(reader)
    await _until(lambda: rules.pending.total() == 0)
    _close(*idle[1:])


async def test_a_client_going_away_gives_its_slot_back(served: Served) -> None:
    rules = served.rules
    assert rules is not None
    idle = [await served.open() for _ in range(CAP)]
    await _until(lambda: rules.pending.pending("127.0.0.1") == CAP)
    _close(*idle)
    await _until(lambda: rules.pending.total() == 0)
    reader, writer = await served.open()
    writer.write(HEALTHZ)
    assert (await _response(reader))[0] == 200
    writer.close()


# -- the settings ---------------------------------------------------------------------


def _values(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_settings(parser, SETTINGS)
    return resolve(parser.parse_args(argv), SETTINGS, env)


def test_the_limits_are_flags_env_vars_and_config_keys(tmp_path: Path) -> None:
    env = {"KAKUREMICHI_DATA_DIR": str(tmp_path)}
    values = _values([], env)
    assert values["request_head_timeout"] == listener.DEFAULT_HEAD_TIMEOUT == 10.0
    assert values["max_pre_request_per_address"] == listener.DEFAULT_PRE_REQUEST_PER_ADDRESS
    assert values["admin_auth_failures"] == 10
    assert settings_from(values)[0].admin_auth_failures == 10
    config = tmp_path / "c.toml"
    config.write_text(
        "request-head-timeout = 2.5\nmax-pre-request-per-address = 7\nadmin-auth-failures = 4\n"
    )
    values = _values([], {**env, "KAKUREMICHI_CONFIG": str(config)})
    assert (
        values["request_head_timeout"],
        values["max_pre_request_per_address"],
        values["admin_auth_failures"],
    ) == (2.5, 7, 4)
    assert settings_from(values)[0].admin_auth_failures == 4
    env |= {
        "KAKUREMICHI_REQUEST_HEAD_TIMEOUT": "3",
        "KAKUREMICHI_MAX_PRE_REQUEST_PER_ADDRESS": "9",
        "KAKUREMICHI_ADMIN_AUTH_FAILURES": "5",
    }
    values = _values([], env)
    assert (
        values["request_head_timeout"],
        values["max_pre_request_per_address"],
        values["admin_auth_failures"],
    ) == (3.0, 9, 5)
    argv = ["--request-head-timeout", "1.5", "--max-pre-request-per-address", "2"]
    values = _values([*argv, "--admin-auth-failures", "1"], env)
    assert (
        values["request_head_timeout"],
        values["max_pre_request_per_address"],
        values["admin_auth_failures"],
    ) == (1.5, 2, 1)
    for flag, bad in [
        ("--request-head-timeout", "0"),
        ("--request-head-timeout", "-1"),
        ("--request-head-timeout", "soon"),
        ("--max-pre-request-per-address", "0"),
        ("--max-pre-request-per-address", "1.5"),
        ("--admin-auth-failures", "0"),
        ("--admin-auth-failures", "x"),
    ]:
        with pytest.raises(ConfigError, match=flag):
            _values([flag, bad], {})


def test_rules_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        listener.HeadRules(0.0)
    with pytest.raises(ValueError):
        listener.HeadRules(1.0, 0)


async def test_the_command_serves_with_its_settings(tmp_path: Path) -> None:
    """``kakuremichi control`` itself: the flag, the env var and the config key arrive."""
    port = free_port()
    config = tmp_path / "control.toml"
    config.write_text("admin-auth-failures = 2\n")
    proc = _spawn(
        tmp_path,
        port,
        "--admin-token",
        ADMIN_TOKEN,
        "--request-head-timeout",
        "0.5",
        "--config",
        str(config),
        env={"KAKUREMICHI_MAX_PRE_REQUEST_PER_ADDRESS": "2"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.wait_for(_wait_ready(url, proc), 30)
        loop = asyncio.get_running_loop()
        started = loop.time()
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        refused = await asyncio.open_connection("127.0.0.1", port)
        assert (await _response(refused[0]))[0] == 429
        for reader, _ in idle:
            assert (await _until_eof(reader))[0] == b""
        assert loop.time() - started <= 3.0
        _close(*idle, refused)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            wrong = {"Authorization": "Bearer wrong-token-0123456789"}
            statuses = [(await client.get("/api/agents", headers=wrong)).status_code for _ in "abc"]
            assert statuses == [401, 401, 429]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert EXPIRED_LINE in err and REFUSED_LINE in err
    assert "wrong-token-0123456789" not in err
