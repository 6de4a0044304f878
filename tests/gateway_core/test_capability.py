"""The gateway's interface backends need CAP_NET_ADMIN: ``has_net_admin`` reads the
effective capability set, ``auto`` picks the userspace backend without it, and asking
for kernel or wireguard-go without it is a configuration error naming the fix."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from common.config import ConfigError, add_settings, resolve
from gateway.wg import device
from gateway.wg.device import has_net_admin


def status(tmp_path: Path, cap_eff: str) -> str:
    path = tmp_path / "status"
    path.write_text(f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")
    return str(path)


@pytest.mark.parametrize(
    ("cap_eff", "expected"),
    [
        ("000001ffffffffff", True),  # root
        ("0000000000001000", True),  # CAP_NET_ADMIN alone (a DynamicUser with it as ambient)
        ("0000000000000400", False),  # CAP_NET_BIND_SERVICE alone
        ("0000000000000000", False),  # uid 10001 in an image
        ("a8000000000", False),  # root in a container without NET_ADMIN (bit 12 clear)
    ],
)
def test_has_net_admin_reads_the_effective_set(
    tmp_path: Path, cap_eff: str, expected: bool
) -> None:
    assert has_net_admin(status(tmp_path, cap_eff)) is expected


def test_unreadable_or_garbled_status_falls_back_to_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device.os, "geteuid", lambda: 1000)
    assert has_net_admin(str(tmp_path / "missing")) is False
    assert has_net_admin(status(tmp_path, "not-hex")) is False
    monkeypatch.setattr(device.os, "geteuid", lambda: 0)
    assert has_net_admin(str(tmp_path / "missing")) is True


def settings(argv: list[str]) -> Any:
    from gateway.main import SETTINGS, settings_from

    parser = argparse.ArgumentParser()
    add_settings(parser, SETTINGS)
    base = ["--control-url", "http://127.0.0.1:1", "--api-key", "gtw_x", "--public-ip", "127.0.0.1"]
    return settings_from(resolve(parser.parse_args(base + argv), SETTINGS, {}))


@pytest.mark.parametrize("backend", ["kernel", "wireguard-go"])
def test_interface_backend_without_the_capability_is_a_config_error(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.main.has_net_admin", lambda: False)
    with pytest.raises(ConfigError, match=r"CAP_NET_ADMIN.*userspace"):
        settings(["--wireguard-backend", backend])
    monkeypatch.setattr("gateway.main.has_net_admin", lambda: True)
    assert settings(["--wireguard-backend", backend]).backend == backend


def test_userspace_and_auto_need_no_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.main.has_net_admin", lambda: False)
    assert settings(["--wireguard-backend", "userspace"]).backend == "userspace"
    assert settings([]).backend == "auto"
