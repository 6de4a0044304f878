"""All three images, built by ``scripts/build-image.sh`` (buildah, vfs storage, chroot
isolation, a debootstrap base image) and run with ``buildah run`` the way
``compose.yaml`` runs them: Control in its image over HTTPS with its self-signed
certificate, the operator's ``kakuremichi admin`` inside Control's container printing the
enrollment tokens (they pin Control's key), a rootless gateway and an agent in theirs,
the sample app in the agent's image, and a request through the gateway's public port
reaching the app.  Each runs as uid 10001 and stops with exit status 0 on SIGTERM.

What cannot run here: ``docker compose`` itself (no Docker engine on this machine, and
``podman run`` fails), so published ports, compose networks, secrets and healthchecks
are not exercised; ``buildah run --isolation chroot`` shares the host's network, so all
four programs listen on the host's loopback.  The compose file is parsed and
cross-checked in test_deploy.py.

Needs root, buildah and (without ``BASE_IMAGE``) debootstrap; the images are built
once per session (tests/images.py), shared with tests/agent/test_image.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.images import KINDS, buildah, run_in, run_line
from tests.support import free_port

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1800)]

UID = "10001"
DATA_DIR = "/var/lib/kakuremichi"
ADMIN_TOKEN = "image-test-admin-token-0123456789"
DOMAIN = "app.images.test"


def image_config(image: str) -> dict[str, Any]:
    result = buildah("inspect", "--type", "image", image)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)["OCIv1"]["config"]
    return config


@pytest.fixture(scope="module")
def containers(images: dict[str, str]) -> Iterator[dict[str, str]]:
    """kind → a working container of its image (its own file system, the image's user)."""
    made: dict[str, str] = {}
    try:
        for kind, image in images.items():
            name = f"kakuremichi-{kind}-images-{os.getpid()}"
            result = buildah("from", "--name", name, image)
            assert result.returncode == 0, result.stderr
            made[kind] = name
        yield made
    finally:
        for name in made.values():
            buildah("rm", name)


@pytest.mark.parametrize("kind", KINDS)
def test_each_image_runs_its_program_as_uid_10001(images: dict[str, str], kind: str) -> None:
    config = image_config(images[kind])
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["kakuremichi", kind]
    assert f"KAKUREMICHI_DATA_DIR={DATA_DIR}" in config["Env"]
    assert DATA_DIR in config["Volumes"]
    assert config["Labels"]["org.opencontainers.image.title"] == f"kakuremichi-{kind}"


def test_control_and_gateway_images_hold_no_compiler_and_use_the_compiled_paths(
    containers: dict[str, str],
) -> None:
    script = (
        "for tool in gcc cc make cython pip; do "
        'if command -v "$tool"; then exit 1; fi; done; '
        "python3 -c 'import netstack.speedups as s, gateway.proxy.h1.read as r;"
        " print(s.IMPLEMENTATION, r.__file__)'"
    )
    for kind in ("control", "gateway"):
        result = run_in(containers[kind], "sh", "-c", script)
        assert result.returncode == 0, (kind, result.stdout, result.stderr)
        implementation, reader = result.stdout.split()
        assert implementation == "cython" and reader.endswith(".so"), (kind, result.stdout)
        assert run_in(containers[kind], "id", "-u").stdout.strip() == UID


def test_gateway_image_without_net_admin_refuses_an_interface_backend_clearly(
    containers: dict[str, str],
) -> None:
    """Only the interface backends need CAP_NET_ADMIN; as uid 10001 without it the gateway
    says so and exits 2 instead of failing somewhere inside."""
    result = run_in(
        containers["gateway"],
        "kakuremichi",
        "gateway",
        "--control-url",
        "https://127.0.0.1:1",
        "--api-key",
        "gtw_x",
        "--public-ip",
        "127.0.0.1",
        "--wireguard-backend",
        "wireguard-go",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CAP_NET_ADMIN" in result.stderr and "userspace" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


class Program:
    """One program running in a container; SIGTERM it through a line on its stdin.

    ``buildah run`` does not hand signals on to the program, so a small shell in the
    container runs it in the background and sends it SIGTERM when a line arrives on
    stdin, then exits with the program's own exit status.
    """

    def __init__(self, container: str, command: list[str], env: dict[str, str]) -> None:
        self.container = container
        self.command = command
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.output = bytearray()
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> Program:
        shell = 'set -m; "$@" & pid=$!; read -r _; kill -TERM "$pid"; wait "$pid"'
        self.process = await asyncio.create_subprocess_exec(
            *run_line(self.container, "sh", "-c", shell, "sh", *self.command, env=self.env),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while chunk := await self.process.stdout.read(65536):
            self.output += chunk

    @property
    def log(self) -> str:
        return self.output.decode(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self) -> int:
        """SIGTERM → the program's exit status (-1 if it had to be killed)."""
        assert self.process is not None and self.process.stdin is not None
        if self.process.returncode is None:
            try:
                self.process.stdin.write(b"stop\n")
                await self.process.stdin.drain()
                self.process.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                async with asyncio.timeout(30):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
                return -1
        if self.reader is not None:
            await self.reader
        return self.process.returncode if self.process.returncode is not None else -1


async def wait_until(what: str, check: Any, programs: list[Program], within: float) -> Any:
    """Poll ``check()`` until it returns something truthy; fail with every program's log."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: object = None
    while loop.time() < deadline:
        for program in programs:
            if not program.alive():
                break
        else:
            try:
                result = await check()
                if result:
                    return result
            except (httpx.HTTPError, OSError, ValueError) as exc:
                last = exc
            await asyncio.sleep(0.3)
            continue
        break
    logs = "\n".join(f"--- {p.command[:2]}\n{p.log}" for p in programs)
    pytest.fail(f"{what}: not within {within} s (last: {last!r})\n{logs}")


@pytest.fixture
async def running(containers: dict[str, str]) -> AsyncIterator[list[Program]]:
    programs: list[Program] = []
    yield programs
    for program in reversed(programs):
        if program.alive():
            await program.stop()


def udp_port() -> int:
    return free_port(kind=socket.SOCK_DGRAM)


async def test_control_gateway_agent_and_app_from_their_images_carry_a_request(
    containers: dict[str, str], running: list[Program]
) -> None:
    control_port, http_port, admin_port, app_port = (free_port() for _ in range(4))
    wireguard_port = udp_port()
    control_url = f"https://127.0.0.1:{control_port}"

    control = Program(
        containers["control"],
        ["kakuremichi", "control", "--host", "127.0.0.1"],
        {
            "KAKUREMICHI_PORT": str(control_port),
            "KAKUREMICHI_TLS_SELF_SIGNED": "true",
            "KAKUREMICHI_PUBLIC_URL": control_url,
            "KAKUREMICHI_ADMIN_TOKEN": ADMIN_TOKEN,
        },
    )
    running.append(await control.start())
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    async with httpx.AsyncClient(verify=unverified, timeout=5) as http:

        async def control_ready() -> bool:
            return (await http.get(f"{control_url}/readyz")).status_code == 200

        await wait_until("Control's /readyz", control_ready, running, within=60)

    # the operator's commands, inside Control's container (compose.yaml's step 2)
    admin = (
        "kakuremichi",
        "admin",
        "--control-url",
        control_url,
        "--control-ca",
        f"{DATA_DIR}/tls/control.crt",
    )
    admin_env = {"KAKUREMICHI_ADMIN_TOKEN": ADMIN_TOKEN}

    def admin_json(*args: str) -> dict[str, Any]:
        noun, verb, *rest = args
        result = run_in(
            containers["control"],
            "kakuremichi",
            "admin",
            noun,
            verb,
            "--control-url",
            control_url,
            "--control-ca",
            f"{DATA_DIR}/tls/control.crt",
            "--json",
            *rest,
            env=admin_env,
        )
        assert result.returncode == 0, (admin, args, result.stdout, result.stderr)
        assert ADMIN_TOKEN not in result.stderr
        row: dict[str, Any] = json.loads(result.stdout)
        return row

    gateway_row = admin_json("gateway", "create", "edge")
    agent_row = admin_json("agent", "create", "app")
    app_target = f"127.0.0.1:{app_port}"
    admin_json("tunnel", "create", "--domain", DOMAIN, "--agent", "app", "--target", app_target)
    for row in (gateway_row, agent_row):
        assert row["token"].startswith("kmt_"), row

    app = Program(
        containers["agent"],
        ["python3", "-m", "kakuremichi.sampleapp", "--host", "127.0.0.1", "--port", str(app_port)],
        {},
    )
    gateway = Program(
        containers["gateway"],
        ["kakuremichi", "gateway"],
        {
            "KAKUREMICHI_TOKEN": gateway_row["token"],
            "KAKUREMICHI_PUBLIC_IP": "127.0.0.1",
            "KAKUREMICHI_HOST": "127.0.0.1",
            "KAKUREMICHI_WIREGUARD_PORT": str(wireguard_port),
            "KAKUREMICHI_HTTP_PORT": str(http_port),
            "KAKUREMICHI_HTTPS_PORT": "0",
            "KAKUREMICHI_ADMIN_HOST": "127.0.0.1",
            "KAKUREMICHI_ADMIN_PORT": str(admin_port),
        },
    )
    agent = Program(
        containers["agent"],
        ["kakuremichi", "agent"],
        {"KAKUREMICHI_TOKEN": agent_row["token"], "KAKUREMICHI_WIREGUARD_HOST": "127.0.0.1"},
    )
    for program in (app, gateway, agent):
        running.append(await program.start())

    async with httpx.AsyncClient(timeout=5) as http:

        async def through_the_tunnel() -> httpx.Response | None:
            response = await http.get(f"http://127.0.0.1:{http_port}/", headers={"Host": DOMAIN})
            return response if response.status_code == 200 else None

        response = await wait_until("a request through the tunnel", through_the_tunnel, running, 90)
        assert "kakuremichi" in response.text.lower(), response.text
        livez = await http.get(f"http://127.0.0.1:{admin_port}/livez")
        assert livez.status_code == 200

    # SIGTERM each, outermost first: each exits 0 and says so
    statuses = {}
    for name, program in (("agent", agent), ("gateway", gateway), ("control", control)):
        statuses[name] = await program.stop()
    logs = {
        name: p.log for name, p in (("agent", agent), ("gateway", gateway), ("control", control))
    }
    assert statuses == {"agent": 0, "gateway": 0, "control": 0}, logs
    assert "agent stopped" in logs["agent"], logs["agent"]
    assert "gateway stopped" in logs["gateway"], logs["gateway"]
    for name, text in logs.items():
        assert "Traceback" not in text, (name, text)
        for secret in (gateway_row["token"], agent_row["token"], ADMIN_TOKEN):
            assert secret not in text, name
    await app.stop()
