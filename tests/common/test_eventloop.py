"""``--event-loop auto|uvloop|asyncio``: one helper runs every command's main coroutine
on the chosen loop; the setting comes from a flag, the environment or the config file
like every other; uvloop asked for but missing, or an unknown loop, exits 2."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import agent.main
import control.main
import gateway.main
from common import eventloop
from common.config import ConfigError, resolve
from kakuremichi import demo
from kakuremichi.cli import build_parser
from kakuremichi.cli import main as cli_main
from tests.agent.test_cli import cli
from tests.controlserver import control_command
from tests.support import free_port, need

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "control": control.main.SETTINGS,
    "gateway": gateway.main.SETTINGS,
    "agent": agent.main.SETTINGS,
    "demo": demo.SETTINGS,
}


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import uvloop`` raises ImportError, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


@pytest.mark.parametrize(("choice", "expected"), [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_run_uses_the_chosen_loop_and_logs_it(
    choice: str, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> type[asyncio.AbstractEventLoop]:
        return type(asyncio.get_running_loop())

    with caplog.at_level(logging.INFO, logger="somecommand"):
        loop_type = eventloop.run(main(), choice, "somecommand")
    if expected == "uvloop":
        import uvloop

        assert loop_type is uvloop.Loop
    else:
        assert issubclass(loop_type, asyncio.SelectorEventLoop)
        assert not loop_type.__module__.startswith("uvloop")
    [record] = [r for r in caplog.records if r.name == "somecommand"]
    assert record.getMessage() == "event loop"
    assert record.fields == {"loop": expected, "choice": choice}  # type: ignore[attr-defined]


def test_auto_is_uvloop_when_importable_else_asyncio(no_uvloop: None) -> None:
    assert eventloop.resolve("asyncio") == "asyncio"
    assert eventloop.resolve("auto") == "asyncio"

    async def main() -> str:
        return eventloop.loop_name(asyncio.get_running_loop())

    assert eventloop.run(main(), "auto", "x") == "asyncio"
    with pytest.raises(ConfigError, match="--event-loop: uvloop is not installed"):
        eventloop.resolve("uvloop")


def test_auto_prefers_uvloop() -> None:
    loop = eventloop.loop_factory("auto")()
    try:
        need(eventloop.loop_name(loop) == "uvloop", "uvloop is not importable here")
    finally:
        loop.close()


def test_a_refused_choice_does_not_leak_the_coroutine(no_uvloop: None) -> None:
    async def main() -> None:
        raise AssertionError("never runs")

    coroutine = main()
    with pytest.raises(ConfigError):
        eventloop.run(coroutine, "uvloop", "x")
    assert coroutine.cr_frame is None  # closed: no "never awaited" warning


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_the_setting_from_flag_env_and_file(
    command: str, tmp_path: Path
) -> None:
    settings = COMMANDS[command]
    assert eventloop.EVENT_LOOP in settings
    parser = build_parser()
    config = tmp_path / "c.toml"
    config.write_text('event_loop = "asyncio"\n')

    def value(argv: list[str], env: dict[str, str]) -> str:
        result: str = resolve(parser.parse_args([command, *argv]), settings, env)["event_loop"]
        return result

    assert value([], {}) == "auto"
    assert value([], {"KAKUREMICHI_CONFIG": str(config)}) == "asyncio"
    assert value(["--config", str(config)], {"KAKUREMICHI_EVENT_LOOP": "uvloop"}) == "uvloop"
    assert value(["--event-loop", "asyncio"], {"KAKUREMICHI_EVENT_LOOP": "uvloop"}) == "asyncio"


def test_uvloop_missing_names_the_setting_it_came_from(no_uvloop: None, tmp_path: Path) -> None:
    parser = build_parser()
    config = tmp_path / "c.toml"
    config.write_text('event-loop = "uvloop"\n')
    for argv, env, source in [
        (["--event-loop", "uvloop"], {}, "--event-loop"),
        ([], {"KAKUREMICHI_EVENT_LOOP": "uvloop"}, "KAKUREMICHI_EVENT_LOOP"),
        (["--config", str(config)], {}, f"event-loop in {config}"),
    ]:
        with pytest.raises(ConfigError, match="uvloop is not installed") as info:
            resolve(parser.parse_args(["agent", *argv]), agent.main.SETTINGS, env)
        assert str(info.value).startswith(source + ":")
    assert resolve(parser.parse_args(["agent"]), agent.main.SETTINGS, {})["event_loop"] == "auto"


def test_uvicorn_gets_the_same_loop() -> None:
    for choice in ("asyncio", "uvloop"):
        server = control.main.server_for(object(), "127.0.0.1", 0, choice)
        assert server.config.loop == choice


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_event_loop_exits_2(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("KAKUREMICHI_"):
            monkeypatch.delenv(name)
    assert cli_main([command, "--event-loop", "trio"]) == 2
    assert (
        f"kakuremichi {command}: configuration error: "
        "--event-loop: 'trio' is not one of auto, uvloop, asyncio"
    ) in capsys.readouterr().err
    monkeypatch.setenv("KAKUREMICHI_EVENT_LOOP", "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert cli_main([command]) == 2
    assert "KAKUREMICHI_EVENT_LOOP: invalid value 'uvloop': uvloop is not installed" in (
        capsys.readouterr().err
    )


def test_uvloop_asked_for_but_not_installed_exits_2(tmp_path: Path) -> None:
    """The real process, with an ``uvloop`` that cannot be imported first on the path."""
    shadow = tmp_path / "uvloop"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('not on this machine')\n")
    result = cli("gateway", env={"KAKUREMICHI_EVENT_LOOP": "uvloop", "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "KAKUREMICHI_EVENT_LOOP: invalid value 'uvloop': uvloop is not installed" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
def test_control_runs_and_stops_on_the_chosen_loop(choice: str, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "control.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            control_command(
                port,
                tmp_path / "data",
                "--admin-token",
                "adm_test_token_0123456789",
                "--event-loop",
                choice,
            ),
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("KAKUREMICHI_")},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        healthy = False
        while not healthy and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                healthy = httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            time.sleep(0.05)
        assert healthy, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f'logger=control msg="event loop" loop={choice} choice={choice}' in text
