"""``kakuremichi demo``: the whole system on one machine, rootless, in one process.

Control (SQLite in a temporary directory), a gateway (userspace WireGuard backend), an
agent and a sample app, all on loopback.  The demo sets them up through Control's REST
API as an operator would with ``kakuremichi admin`` (an agent, a gateway, an HTTP
tunnel), waits until a request makes it through gateway → WireGuard → agent → app,
and prints a ``curl`` line to try.  It then runs until Ctrl-C / SIGTERM; ``--check``
exits after the first successful request instead (exit 0), which is what the README's
first command and the tests use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from agent.runtime import Agent, AgentSettings
from common import eventloop, logs
from common.config import COMMON, ConfigError, Setting, add_settings, boolean, port, resolve
from common.eventloop import EVENT_LOOP
from control.app import ControlSettings, create_app
from control.main import server_for
from gateway.runtime import Gateway, GatewaySettings
from kakuremichi import sampleapp

log = logging.getLogger("demo")

HOST = "127.0.0.1"

SETTINGS: tuple[Setting, ...] = (
    Setting("control-port", "Control's port (REST API, WebSocket hub)", 7700, parse=port),
    Setting("http-port", "the gateway's public HTTP port", 8080, parse=port),
    Setting("admin-port", "the gateway's /metrics and /healthz port", 9901, parse=port),
    Setting("wireguard-port", "the gateway's WireGuard UDP port", 51820, parse=port),
    Setting("domain", "the tunnel's public host name", "demo.localhost", metavar="NAME"),
    Setting(
        "target",
        "publish this local service instead of the built-in sample app "
        "(host:port or http(s)://host:port)",
        None,
        metavar="TARGET",
    ),
    Setting(
        "data-dir",
        "state directory (must be new or empty; default: a temporary one, removed at exit)",
        None,
        metavar="DIR",
    ),
    Setting(
        "check",
        "exit after one successful request through the tunnel (0) or a failure (1)",
        False,
        parse=boolean,
        metavar="BOOL",
    ),
    Setting(
        "timeout",
        "seconds to wait for the first request to make it through",
        60.0,
        parse=float,
        metavar="SECONDS",
    ),
    EVENT_LOOP,
    *COMMON,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class _Served:
    """A uvicorn server running as a task of this loop."""

    def __init__(self, server: uvicorn.Server, what: str) -> None:
        self.server = server
        self.server.install_signal_handlers = False  # type: ignore[attr-defined]
        self.what = what
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        async with asyncio.timeout(15):
            while not self.server.started:
                if self.task.done():
                    raise ConfigError(f"{self.what} could not start (is its port already in use?)")
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 15)


async def _create(api: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post(path, json=body)
    if response.status_code != 201:
        raise RuntimeError(f"POST {path} failed: {response.status_code} {response.text[:300]}")
    data: dict[str, Any] = response.json()
    return data


async def _wait_through(url: str, domain: str, within: float) -> httpx.Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last = "no answer yet"
    next_note = loop.time() + 5
    async with httpx.AsyncClient(timeout=10) as client:
        while loop.time() < deadline:
            try:
                response = await client.get(url, headers={"Host": domain})
                if response.status_code == 200:
                    return response
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}"
            if loop.time() > next_note:
                log.info("waiting for the tunnel", extra=logs.kv(last=last))
                next_note = loop.time() + 5
            await asyncio.sleep(0.2)
    raise TimeoutError(f"no request made it through the tunnel within {within:g}s ({last})")


async def demo(values: dict[str, Any], data: Path) -> int:
    token = "adm_demo_" + secrets.token_urlsafe(24)
    control_url = f"http://{HOST}:{values['control_port']}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    # the dashboard's one-time setup link is shown in the banner below, not as it starts
    control_app = create_app(
        ControlSettings(
            database_url=f"sqlite+aiosqlite:///{data / 'control.db'}",
            admin_token=token,
            announce=lambda text: None,
            listen_url=control_url,
        )
    )
    control = _Served(
        server_for(
            control_app,
            HOST,
            values["control_port"],
            values["event_loop"],
        ),
        f"Control on {HOST}:{values['control_port']}",
    )
    app: _Served | None = None
    gateway: Gateway | None = None
    agent: Agent | None = None
    try:
        log.info("starting control", extra=logs.kv(url=control_url, data_dir=str(data)))
        await control.start()
        target = values["target"]
        if target is None:
            app_port = _free_port()
            app = _Served(
                uvicorn.Server(
                    uvicorn.Config(
                        sampleapp.create_app(),
                        host=HOST,
                        port=app_port,
                        log_config=None,
                        lifespan="off",
                    )
                ),
                "the sample app",
            )
            await app.start()
            target = f"http://{HOST}:{app_port}"
            log.info("sample app listening", extra=logs.kv(url=target))
        async with httpx.AsyncClient(
            base_url=control_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        ) as api:
            agent_row = await _create(api, "/api/agents", {"name": "demo-agent"})
            gateway_row = await _create(api, "/api/gateways", {"name": "demo-gateway"})
            await _create(
                api,
                "/api/tunnels",
                {"domain": values["domain"], "agent": "demo-agent", "target": target},
            )
        log.info(
            "created agent, gateway and tunnel",
            extra=logs.kv(
                domain=values["domain"], target=target, virtual_ip=agent_row.get("virtualIp")
            ),
        )
        gateway = Gateway(
            GatewaySettings(
                control_url=control_url,
                api_key=gateway_row["apiKey"],
                data_dir=data / "gateway",
                public_ip=HOST,
                wireguard_port=values["wireguard_port"],
                backend="userspace",
                host=HOST,
                http_port=values["http_port"],
                https_port=0,
                admin_host=HOST,
                admin_port=values["admin_port"],
            )
        )
        await gateway.start()
        agent = Agent(
            AgentSettings(
                control_url=control_url,
                api_key=agent_row["apiKey"],
                data_dir=data / "agent",
                wireguard_host=HOST,
            )
        )
        await agent.start()
        public = f"http://{HOST}:{values['http_port']}/"
        response = await _wait_through(public, values["domain"], values["timeout"])
        curl = f"curl -H 'Host: {values['domain']}' {public}"
        print(
            "\n"
            "kakuremichi demo is up: everything on loopback, no root needed (user-space WireGuard).\n"
            f"  control    {control_url}  (admin token {token})\n"
            f"  dashboard  {control_url}/  (sign in the first time through this one-time link:\n"
            f"             {control_app.state.dashboard.setup_url} )\n"
            f"  gateway    {public}  (WireGuard udp/{values['wireguard_port']}, "
            f"metrics http://{HOST}:{values['admin_port']}/metrics)\n"
            f"  agent      {agent_row.get('virtualIp')} inside the tunnel, "
            f"forwarding {values['domain']} to {target}\n"
            f"\nThrough the tunnel just now: HTTP {response.status_code}: "
            f"{response.text.strip()[:120]}\n"
            f"\nTry:\n  {curl}\n"
            f"  kakuremichi admin tunnel list --control-url {control_url} "
            f"--admin-token {token}\n",
            flush=True,
        )
        if values["check"]:
            return 0
        print("Press Ctrl-C to stop.", flush=True)
        await stop.wait()
        return 0
    except TimeoutError as exc:
        log.error("demo failed", extra=logs.kv(error=str(exc)))
        return 1
    finally:
        log.info("stopping the demo")
        if agent is not None:
            await agent.stop()
        if gateway is not None:
            await gateway.stop()
        if app is not None:
            await app.stop()
        await control.stop()


def run(args: argparse.Namespace) -> int:
    values = resolve(args, SETTINGS)
    if values["timeout"] <= 0:
        raise ConfigError("--timeout: must be > 0")
    given = values["data_dir"]
    data = Path(given).expanduser() if given else Path(tempfile.mkdtemp(prefix="kakuremichi-"))
    if given and data.exists() and any(data.iterdir()):
        raise ConfigError(f"--data-dir: {data} is not empty (the demo starts from scratch)")
    try:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"--data-dir: cannot create {data}: {exc.strerror}") from exc
    logs.setup(values["log_format"], values["log_level"])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    try:
        return eventloop.run(demo(values, data.resolve()), values["event_loop"], "demo")
    except RuntimeError as exc:
        print(f"kakuremichi demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if not given:
            shutil.rmtree(data, ignore_errors=True)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run control + gateway + agent + a sample app on loopback (rootless)",
        description=(
            "The whole system on this machine, in one process, without root: Control, a "
            "gateway with the userspace WireGuard backend, an agent and a sample web app, "
            "all on 127.0.0.1. Creates an agent, a gateway and an HTTP tunnel through the "
            "REST API, waits for a request to make it through the tunnel, then prints a "
            "curl line to try. Ctrl-C stops everything and removes the temporary state."
        ),
    )
    add_settings(parser, SETTINGS)
    parser.set_defaults(run=run)
