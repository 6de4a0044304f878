"""deploy/: the compose file parses and names its images, volumes, secrets, ports and
probes consistently with the Dockerfiles and the programs' defaults; the systemd units
pass ``systemd-analyze verify`` (with ExecStart pointed at this checkout's command) and
keep their hardening.  Building and running the images as the compose file does is
test_images.py's job (see the README's deploy section for what cannot run here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import need_binary

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def test_compose_names_images_volumes_secrets_and_probes_consistently() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"control", "gateway", "agent", "app"}
    for name in ("control", "gateway", "agent"):
        service = services[name]
        dockerfile = service["build"]["dockerfile"]
        assert (ROOT / dockerfile).is_file(), dockerfile
        assert service["image"] == f"localhost/kakuremichi-{name}:latest"
        entry = re.search(r'ENTRYPOINT \["kakuremichi", "(\w+)"\]', (ROOT / dockerfile).read_text())
        assert entry and entry.group(1) == name
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"]
            assert volume.split(":")[1] == "/var/lib/kakuremichi"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"]
            assert service["environment"]["KAKUREMICHI_TOKEN_FILE"] == f"/run/secrets/{secret}"
        assert service["healthcheck"]["test"][0] == "CMD"
    assert services["app"]["image"] == services["agent"]["image"]
    # the gateway's published ports lead to the ports it is told to listen on
    env = services["gateway"]["environment"]
    inside = {p.split(":")[1] for p in services["gateway"]["ports"]}
    assert {env["KAKUREMICHI_HTTP_PORT"], env["KAKUREMICHI_HTTPS_PORT"], "51820/udp"} <= inside
    assert "9901/livez" in services["gateway"]["healthcheck"]["test"][-1]
    assert services["agent"]["environment"]["KAKUREMICHI_METRICS_PORT"] == "9901"


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_units_are_hardened(unit: Path) -> None:
    text = unit.read_text()
    for line in (
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=",
    ):
        assert line in text, line
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M)
    assert caps is not None
    if "gateway" in unit.name:
        assert set(caps.group(1).split()) == {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    else:
        assert caps.group(1) == ""


def test_units_verify(tmp_path: Path) -> None:
    analyze = need_binary("systemd-analyze")
    command = shutil.which("kakuremichi") or str(ROOT / ".venv" / "bin" / "kakuremichi")
    for unit in UNITS:
        (tmp_path / unit.name).write_text(
            unit.read_text().replace("/usr/local/bin/kakuremichi", command)
        )
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / u.name) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and not complaints, complaints
