"""``--congestion`` (``KAKUREMICHI_CONGESTION``, config key ``congestion``): from the
command line to the congestion controller of the agent's tunnelled TCP connections."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.device import DEFAULT_CONGESTION
from agent.main import SETTINGS, register, settings_from
from agent.runtime import Agent
from common.config import resolve
from netstack.bbr import Bbr
from netstack.congestion import Cubic, NewReno

ROOT = Path(__file__).resolve().parents[2]
CONTROLLERS = {"cubic": Cubic, "newreno": NewReno, "bbr": Bbr}


def _values(argv: list[str], environ: dict[str, str]) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["agent", "--control-url", "http://127.0.0.1:1", *argv])
    return resolve(args, SETTINGS, environ={"KAKUREMICHI_API_KEY": "agt_x", **environ})


def _stack_controller(tmp_path: Path, values: dict[str, object]) -> object:
    """The controller a connection of the agent's own stack gets."""
    settings = settings_from({**values, "data_dir": str(tmp_path / "agent")})
    agent = Agent(settings)
    try:
        conn = agent.data_plane.tunnel.stack.connect("10.0.0.1", 80, now=0.0)
        assert conn.config.congestion_control == settings.congestion
        return conn._cc
    finally:
        agent.data_plane.close()


@pytest.mark.parametrize(
    ("argv", "environ", "config", "expected"),
    [
        ([], {}, None, DEFAULT_CONGESTION),  # the stack's default
        (["--congestion", "bbr"], {}, None, "bbr"),
        ([], {"KAKUREMICHI_CONGESTION": "newreno"}, None, "newreno"),
        ([], {}, 'congestion = "bbr"\n', "bbr"),
        (["--congestion", "cubic"], {"KAKUREMICHI_CONGESTION": "bbr"}, None, "cubic"),
    ],
    ids=["default", "flag", "env", "config-file", "flag-over-env"],
)
def test_the_setting_reaches_the_agents_stack(
    tmp_path: Path,
    argv: list[str],
    environ: dict[str, str],
    config: str | None,
    expected: str,
) -> None:
    if config is not None:
        (tmp_path / "agent.toml").write_text(config)
        environ = {**environ, "KAKUREMICHI_CONFIG": str(tmp_path / "agent.toml")}
    values = _values(argv, environ)
    assert values["congestion"] == expected
    assert type(_stack_controller(tmp_path, values)) is CONTROLLERS[expected]


def test_help_names_the_choices() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "kakuremichi.cli", "agent", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    ).stdout
    flat = " ".join(help_text.split())
    assert "--congestion" in flat and "KAKUREMICHI_CONGESTION" in flat
    for name in CONTROLLERS:
        assert name in flat


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (("--congestion", "reno"), {}, "--congestion"),
        ((), {"KAKUREMICHI_CONGESTION": "BBR"}, "KAKUREMICHI_CONGESTION"),
        ((), {"KAKUREMICHI_CONFIG": "{config}"}, "congestion in"),
    ],
    ids=["flag", "env", "config-file"],
)
def test_a_bad_value_exits_2_naming_the_setting(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], named: str
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('congestion = "vegas"\n')
    clean = {k: "" for k in os.environ if k.startswith("KAKUREMICHI_")}
    env = {k: v.format(config=config) for k, v in env.items()}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kakuremichi.cli",
            "agent",
            "--control-url",
            "http://127.0.0.1:1",
            "--data-dir",
            str(tmp_path / "data"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **clean, "KAKUREMICHI_API_KEY": "agt_secret", **env},
    )
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "cubic, newreno, bbr" in result.stderr
    assert "agt_secret" not in result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created
