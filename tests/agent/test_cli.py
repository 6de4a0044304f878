"""``kakuremichi agent`` and ``kakuremichi demo`` as a user runs them: flags, env,
config errors, the demo end to end, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.main import settings_from
from common.config import ConfigError
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kakuremichi.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_agent_help_explains_the_flags() -> None:
    result = cli("agent", "--help")
    assert result.returncode == 0
    for flag in (
        "--control-url",
        "--api-key",
        "--data-dir",
        "--keepalive",
        "--connect-timeout",
        "--transport",
        "KAKUREMICHI_",
    ):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        ((), {}, "--control-url"),
        (("--control-url", "http://127.0.0.1:1"), {}, "--api-key"),
        (("--control-url", "ftp://x", "--api-key", "agt_x"), {}, "--control-url"),
        (("--control-url", "http://127.0.0.1:1", "--api-key", "gtw_wrongkind"), {}, "--api-key"),
        (
            ("--control-url", "http://127.0.0.1:1", "--keepalive", "0"),
            {"KAKUREMICHI_API_KEY": "agt_x"},
            "keepalive",
        ),
        (
            ("--control-url", "http://127.0.0.1:1", "--wireguard-host", "nope"),
            {"KAKUREMICHI_API_KEY": "agt_x"},
            "--wireguard-host",
        ),
        (
            ("--control-url", "http://127.0.0.1:1"),
            {"KAKUREMICHI_API_KEY": "agt_x", "KAKUREMICHI_TRANSPORT": "quic"},
            "KAKUREMICHI_TRANSPORT",
        ),
    ],
)
def test_agent_configuration_errors_exit_2_naming_the_setting(
    args: tuple[str, ...], env: dict[str, str], names: str
) -> None:
    clean = {k: "" for k in os.environ if k.startswith("KAKUREMICHI_")}
    result = cli("agent", *args, env={**clean, **env})
    assert result.returncode == 2, result.stderr
    assert names in result.stderr
    assert "agt_x" not in result.stderr  # secrets never echoed


def test_agent_settings_from_env_file(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("agt_from_file\n")
    result = cli(
        "agent",
        "--control-url",
        "http://127.0.0.1:1",
        "--health-interval",
        "-1",
        env={"KAKUREMICHI_API_KEY_FILE": str(secret)},
    )
    assert result.returncode == 2 and "health-interval" in result.stderr
    settings = settings_from(
        {
            "control_url": "https://control.example.com",
            "api_key": "agt_abc",
            "data_dir": "~/x",
            "wireguard_host": "::",
            "wireguard_port": 0,
            "keepalive": 25,
            "mtu": 1420,
            "connect_timeout": 5.0,
            "udp_idle_timeout": 60.0,
            "health_interval": 15.0,
            "probe_interval": 30.0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "transport": "tcp",
        }
    )
    assert settings.data_dir == Path("~/x").expanduser() and settings.wireguard_host == "::"
    assert settings.transport == "tcp"
    with pytest.raises(ConfigError):
        settings_from({"control_url": None, "api_key": "agt_abc"})


def test_agent_keeps_retrying_control_and_stops_on_sigterm(tmp_path: Path) -> None:
    """Control unreachable is transient: the agent logs, backs off, and SIGTERM ends it
    with 0; its key pair is created 0600 on first start."""
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kakuremichi.cli",
                "agent",
                "--control-url",
                f"http://127.0.0.1:{free_port()}",
                "--data-dir",
                str(tmp_path / "state"),
                "--wireguard-host",
                "127.0.0.1",
                "--log-format",
                "json",
            ],
            cwd=ROOT,
            env={**os.environ, "KAKUREMICHI_API_KEY": "agt_secret_value_123"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "reconnecting" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reconnecting" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "agent stopped" in text and "agt_secret_value_123" not in text
    keys = list((tmp_path / "state").iterdir())
    assert keys and all(p.stat().st_mode & 0o077 == 0 for p in keys if p.is_file())


def test_demo_runs_end_to_end() -> None:
    result = cli(
        "demo",
        "--check",
        "true",
        "--control-port",
        str(control := free_port()),
        "--http-port",
        str(http := free_port()),
        "--admin-port",
        str(free_port()),
        "--wireguard-port",
        str(free_port()),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "Through the tunnel just now: HTTP 200: Hello from the kakuremichi sample app"
        in result.stdout
    )
    assert f"curl -H 'Host: demo.localhost' http://127.0.0.1:{http}/" in result.stdout
    assert "agent stopped" in result.stderr and "gateway stopped" in result.stderr
    # the dashboard and its one-time setup link, printed, never logged
    assert f"dashboard  http://127.0.0.1:{control}/ " in result.stdout
    assert re.search(rf"http://127\.0\.0\.1:{control}/setup\?token=stp_[\w-]{{40,}}", result.stdout)
    assert "stp_" not in result.stderr


def test_demo_refuses_a_used_data_dir(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    result = cli("demo", "--check", "true", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "--data-dir" in result.stderr
