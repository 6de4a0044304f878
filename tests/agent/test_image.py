"""The agent's container image, built from ``Dockerfile.agent`` by
``scripts/build-image.sh`` (buildah, vfs storage, chroot isolation, a debootstrap
base image; once per session for all three images, tests/images.py) and run with
``buildah run``: non-root, ``kakuremichi agent`` as entrypoint,
the compiled netstack module inside, no compiler, configuration errors exit 2, and the
agent in the image registers with a real Control on loopback.

Needs root, buildah and (without ``BASE_IMAGE``) debootstrap.  The first build takes a
few minutes (debootstrap, apt, pip); the base tarball is cached under
``~/.cache/kakuremichi`` and the images and cached layers stay in buildah's storage
(``buildah --storage-driver vfs images``), so later runs take about a minute.  Only the
working container is removed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.controlserver import RunningControl, create
from tests.images import buildah, run_in, run_line

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1800)]

UID = "10001"
DATA_DIR = "/var/lib/kakuremichi"
SIZE_BUDGET = 250_000_000  # bytes; today ~200 MB, a compiler would add ~500 MB


@pytest.fixture(scope="module")
def image(images: dict[str, str]) -> str:
    """The agent's image (tests/images.py builds all three once per session)."""
    return images["agent"]


@pytest.fixture(scope="module")
def config(image: str) -> dict[str, Any]:
    result = buildah("inspect", "--type", "image", image)
    assert result.returncode == 0, result.stderr
    oci: dict[str, Any] = json.loads(result.stdout)["OCIv1"]["config"]
    return oci


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[str]:
    """A working container of the image; ``buildah run`` uses its user, env and workdir."""
    name = f"kakuremichi-agent-test-{os.getpid()}"
    result = buildah("from", "--name", name, image)
    assert result.returncode == 0, result.stderr
    try:
        yield name
    finally:
        buildah("rm", name)


def test_image_runs_kakuremichi_agent_as_uid_10001(config: dict[str, Any]) -> None:
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["kakuremichi", "agent"]
    assert f"KAKUREMICHI_DATA_DIR={DATA_DIR}" in config["Env"]
    assert "PYTHONUNBUFFERED=1" in config["Env"]
    assert DATA_DIR in config["Volumes"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "kakuremichi-agent"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def test_image_is_small(container: str) -> None:
    mounted = buildah("mount", container)
    assert mounted.returncode == 0, mounted.stderr
    try:
        size = sum(
            os.lstat(os.path.join(directory, name)).st_size
            for directory, _, files in os.walk(mounted.stdout.strip())
            for name in files
        )
    finally:
        buildah("umount", container)
    assert size < SIZE_BUDGET, f"the image holds {size / 1e6:.0f} MB"


def test_entrypoint_help_runs_as_the_unprivileged_user(
    container: str, config: dict[str, Any]
) -> None:
    identity = run_in(container, "id", "-u")
    assert identity.stdout.strip() == UID, identity.stderr
    entrypoint: list[str] = config["Entrypoint"]
    result = run_in(container, *entrypoint, "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--control-url", "--api-key", "--data-dir", "KAKUREMICHI_"):
        assert flag in result.stdout


def test_compiled_netstack_is_in_use(container: str) -> None:
    result = run_in(
        container,
        "python",
        "-c",
        "import netstack._fast, netstack.wireguard._fast, netstack.speedups as s,"
        " netstack.wireguard.speedups as w;"
        " print(s.IMPLEMENTATION, w.IMPLEMENTATION, netstack._fast.__file__,"
        " netstack.wireguard._fast.__file__)",
    )
    assert result.returncode == 0, result.stderr
    tcp, wireguard, *paths = result.stdout.split()
    assert tcp == wireguard == "cython"
    for path in paths:
        assert path.startswith("/opt/kakuremichi/") and path.endswith(".so"), path


def test_no_compiler_headers_or_sources_in_the_image(container: str) -> None:
    script = (
        "for tool in gcc cc c++ make ld cython pip; do "
        'if command -v "$tool"; then exit 1; fi; done; '
        "for path in /usr/include/python3.11 /src; do "
        'if [ -e "$path" ]; then echo "$path"; exit 1; fi; done'
    )
    result = run_in(container, "sh", "-c", script)
    assert result.returncode == 0, f"found in the image: {result.stdout}"


CONTROL = ("--control-url", "http://127.0.0.1:1")
KEY = ("--api-key", "agt_x")


@pytest.mark.parametrize(
    ("args", "setting"),
    [
        ((), "--control-url"),
        ((*CONTROL, "--api-key", "gtw_wrongkind"), "--api-key"),
        ((*CONTROL, *KEY, "--keepalive", "0"), "keepalive"),
        ((*CONTROL, *KEY, "--data-dir", "/opt/state"), "--data-dir"),  # root could create it
    ],
)
def test_bad_configuration_exits_2_naming_the_setting(
    container: str, config: dict[str, Any], args: tuple[str, ...], setting: str
) -> None:
    entrypoint: list[str] = config["Entrypoint"]
    result = run_in(container, *entrypoint, *args)
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr
    assert setting in result.stderr
    assert "agt_x" not in result.stderr


async def came_online(api: httpx.AsyncClient, agent_id: str, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            while not (await api.get(f"/api/agents/{agent_id}")).json()["online"]:
                await asyncio.sleep(0.2)
    except TimeoutError:
        return False
    return True


async def test_agent_in_the_image_registers_with_control_and_stops_cleanly(
    container: str, control: RunningControl, api: httpx.AsyncClient
) -> None:
    """Control on the host's loopback (chroot isolation shares the network); the key comes
    from the environment, the state goes to the KAKUREMICHI_DATA_DIR volume; SIGTERM → 0."""
    row = await create(api, "agent", "in-the-image")
    env = {"KAKUREMICHI_CONTROL_URL": control.url, "KAKUREMICHI_API_KEY": row["apiKey"]}
    # timeout(1) sends the agent SIGTERM after 15 s and passes on its exit status
    command = ("timeout", "--preserve-status", "--signal=TERM", "15", "kakuremichi", "agent")
    process = await asyncio.create_subprocess_exec(
        *run_line(container, *command, env=env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        online = await came_online(api, row["id"], within=12)
        async with asyncio.timeout(60):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = stderr.decode() + stdout.decode()
    assert online, f"the agent never came online:\n{log}"
    assert process.returncode == 0, log
    assert "agent started" in log and "agent stopped" in log
    public_key = (await api.get(f"/api/agents/{row['id']}")).json()["publicKey"]
    assert re.search(rf'public_key="?{re.escape(public_key)}', log), log
    key_file = run_in(container, "sh", "-c", f"stat -c '%u %a' {DATA_DIR}/wireguard.key")
    assert key_file.stdout.split() == [UID, "600"], key_file.stderr
