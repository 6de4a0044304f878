"""The gateway's connection cap as a user sets it (``--max-connections``) and the
open-file limit raised to fit it at start (``common.service``)."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

import gateway.main
from common.config import ConfigError, resolve
from common.service import raise_open_file_limit
from kakuremichi.cli import build_parser

BASE = ["gateway", "--control-url", "http://127.0.0.1:1", "--public-ip", "192.0.2.1"]
ENV = {"KAKUREMICHI_API_KEY": "gtw_test"}


def settings(argv: list[str], env: dict[str, str] | None = None) -> gateway.main.GatewaySettings:
    values = resolve(build_parser().parse_args([*BASE, *argv]), gateway.main.SETTINGS, env or ENV)
    return gateway.main.settings_from(values)


def test_max_connections_from_flag_and_env() -> None:
    assert settings([]).limits.max_connections == 10_000
    assert settings(["--max-connections", "25000"]).limits.max_connections == 25_000
    env = {**ENV, "KAKUREMICHI_MAX_CONNECTIONS": "0"}
    assert settings([], env).limits.max_connections == 0  # unlimited


def test_a_negative_cap_is_a_configuration_error_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="--max-connections"):
        settings(["--max-connections", "-1"])


@pytest.fixture
def restore_limit() -> Iterator[tuple[int, int]]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_the_soft_limit_is_raised_to_what_is_wanted(restore_limit: tuple[int, int]) -> None:
    _, hard = restore_limit
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"hard open-file limit {hard} leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    assert raise_open_file_limit(2000, "test") == 2000
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (2000, hard)
    assert raise_open_file_limit(1500, "test") == 2000  # never lowered


def test_beyond_the_hard_limit_stops_there_and_warns(
    restore_limit: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, hard = restore_limit
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit to reach")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    with caplog.at_level("WARNING", logger="test"):
        assert raise_open_file_limit(hard + 1, "test") == hard
    assert any("lower than the connections allowed" in r.getMessage() for r in caplog.records)
    assert raise_open_file_limit(None, "test") == hard
