"""``kakuremichi admin`` verbs against a real Control process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.control.test_lifecycle import _spawn, _wait_ready
from tests.controlserver import ADMIN_TOKEN
from tests.support import free_port


@pytest.fixture
def control_url(tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    proc = _spawn(tmp_path, port, "--admin-token", ADMIN_TOKEN)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(_wait_ready(url, proc))
    yield url
    proc.terminate()
    proc.communicate(timeout=20)


def admin(url: str, *args: str, token: str = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KAKUREMICHI_CONTROL_URL": url, "KAKUREMICHI_ADMIN_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "kakuremichi.cli", "admin", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_admin_verbs(control_url: str) -> None:
    created = admin(control_url, "agent", "create", "laptop")
    assert created.returncode == 0, created.stderr
    assert "shown once" in created.stdout and "agt_" in created.stdout
    gw = admin(control_url, "gateway", "create", "edge", "--json")
    assert json.loads(gw.stdout)["apiKey"].startswith("gtw_")
    tunnel = admin(
        control_url,
        "tunnel",
        "create",
        "--domain",
        "app.example.com",
        "--agent",
        "laptop",
        "--target",
        "127.0.0.1:8080",
        "--json",
    )
    assert tunnel.returncode == 0, tunnel.stderr
    tunnel_id = json.loads(tunnel.stdout)["id"]
    listing = admin(control_url, "tunnel", "list")
    assert "app.example.com" in listing.stdout and "laptop" in listing.stdout
    assert "agt_" not in admin(control_url, "agent", "list").stdout
    dup = admin(
        control_url,
        "tunnel",
        "create",
        "--domain",
        "app.example.com",
        "--agent",
        "laptop",
        "--target",
        "127.0.0.1:8080",
    )
    assert dup.returncode == 1 and "409" in dup.stderr and "Traceback" not in dup.stderr
    bad = admin(
        control_url,
        "tunnel",
        "create",
        "--domain",
        "bad domain",
        "--agent",
        "laptop",
        "--target",
        "x",
    )
    assert bad.returncode == 1 and "422" in bad.stderr
    updated = admin(control_url, "tunnel", "update", tunnel_id, "--disable", "--json")
    assert json.loads(updated.stdout)["enabled"] is False
    assert admin(control_url, "tunnel", "delete", tunnel_id).returncode == 0
    assert admin(control_url, "agent", "delete", "laptop").returncode == 0
    wrong = admin(control_url, "agent", "list", token="not-the-token-at-all")
    assert wrong.returncode == 1 and "401" in wrong.stderr


def test_admin_without_token_or_server() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAKUREMICHI_")}
    result = subprocess.run(
        [sys.executable, "-m", "kakuremichi.cli", "admin", "agent", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2 and "--admin-token" in result.stderr
    down = admin(f"http://127.0.0.1:{free_port()}", "agent", "list")
    assert down.returncode == 1 and "cannot reach Control" in down.stderr
