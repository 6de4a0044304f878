"""Settings precedence: flag > env > env _FILE > config file > default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from common.config import ConfigError, Setting, add_settings, port, resolve
from common.logs import redact

SETTINGS = (
    Setting("listen-port", "port", 7700, parse=port),
    Setting("api-key", "key", None, secret=True),
    Setting("mode", "mode", "a", choices=("a", "b")),
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings(parser, SETTINGS)
    return parser.parse_args(argv)


def test_precedence(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    config = tmp_path / "c.toml"
    config.write_text('listen-port = 1000\napi_key = "from-config"\nmode = "b"\n')
    assert resolve(parse([]), SETTINGS, {}) == {"listen_port": 7700, "api_key": None, "mode": "a"}
    env = {"KAKUREMICHI_CONFIG": str(config)}
    assert resolve(parse([]), SETTINGS, env) == {
        "listen_port": 1000,
        "api_key": "from-config",
        "mode": "b",
    }
    env["KAKUREMICHI_API_KEY_FILE"] = str(secret)
    assert resolve(parse([]), SETTINGS, env)["api_key"] == "from-file"
    env["KAKUREMICHI_API_KEY"] = "from-env"
    env["KAKUREMICHI_LISTEN_PORT"] = "2000"
    assert resolve(parse([]), SETTINGS, env)["api_key"] == "from-env"
    values = resolve(parse(["--listen-port", "3000", "--api-key", "flag"]), SETTINGS, env)
    assert values["listen_port"] == 3000 and values["api_key"] == "flag"


@pytest.mark.parametrize(
    ("argv", "env", "file_text", "needle"),
    [
        (["--listen-port", "70000"], {}, None, "--listen-port"),
        ([], {"KAKUREMICHI_LISTEN_PORT": "http"}, None, "KAKUREMICHI_LISTEN_PORT"),
        (["--mode", "c"], {}, None, "--mode"),
        ([], {"KAKUREMICHI_API_KEY_FILE": "/nope/nope"}, None, "KAKUREMICHI_API_KEY_FILE"),
        ([], {}, "listen-port = = 1", "not valid TOML"),
        ([], {}, "colour = 'red'", "unknown key"),
    ],
)
def test_errors_name_the_setting(
    tmp_path: Path, argv: list[str], env: dict[str, str], file_text: str | None, needle: str
) -> None:
    if file_text is not None:
        config = tmp_path / "c.toml"
        config.write_text(file_text)
        env = {**env, "KAKUREMICHI_CONFIG": str(config)}
    with pytest.raises(ConfigError, match=needle):
        resolve(parse(argv), SETTINGS, env)


def test_secret_values_are_not_echoed_in_errors() -> None:
    secret = Setting("token", "t", None, secret=True, parse=lambda v: int(v))
    parser = argparse.ArgumentParser()
    add_settings(parser, (secret,))
    with pytest.raises(ConfigError) as info:
        resolve(parser.parse_args(["--token", "supersecretvalue"]), (secret,), {})
    assert "supersecretvalue" not in str(info.value)


def test_redaction() -> None:
    text = "auth agt_abcdefghijklmnop and gtw_ZZZZZZZZZZZZ with Bearer abcdefghijklmnopqrstuvwxyz"
    cleaned = redact(text)
    assert "abcdefghijklmnop" not in cleaned and "ZZZZZZZZZZZZ" not in cleaned
    assert "agt_<redacted>" in cleaned and "Bearer <redacted>" in cleaned
