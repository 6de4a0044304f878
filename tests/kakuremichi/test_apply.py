"""``kakuremichi apply -f`` and ``kakuremichi export`` against a real Control: the dry run
prints exactly the changes apply then makes, a second apply changes nothing, export
round-trips through apply, --prune deletes what the file no longer names, keys and
tokens are printed once and never exported, and bad files get errors naming the line
and the field."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import httpx
import pytest

from kakuremichi import cli
from kakuremichi.apply import FileError, parse
from tests.controlserver import ADMIN_TOKEN, RunningControl

FILE = """\
version: 1
agents:
  - name: laptop
  - server
gateways:
  - name: edge-1
tunnels:
  - domain: App.Example.com
    agent: laptop
    target: 127.0.0.1:8080
  - protocol: tcp
    public_port: 2222
    agent: server
    target: 127.0.0.1:22
    enabled: false
  - domain: api.example.com
    agent: laptop
    target: http://127.0.0.1:9000/v1
"""


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = await asyncio.to_thread(cli.main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def changes(lines: list[str]) -> list[str]:
    return [line for line in lines if line[:2] in ("+ ", "~ ", "- ")]


async def test_apply_dry_run_export_round_trip_and_prune(
    control: RunningControl,
    api: httpx.AsyncClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = ("--control-url", control.url, "--admin-token", ADMIN_TOKEN)
    path = tmp_path / "kakuremichi.yaml"
    path.write_text(FILE)

    code, dry, _ = await run(capsys, "apply", "-f", str(path), "--dry-run", *options)
    assert code == 0
    planned = changes(dry)
    assert planned == [
        "+ agent laptop",
        "+ agent server",
        "+ gateway edge-1",
        "+ tunnel http app.example.com -> laptop 127.0.0.1:8080",
        "+ tunnel tcp 2222 -> server 127.0.0.1:22 (disabled)",
        "+ tunnel http api.example.com -> laptop http://127.0.0.1:9000/v1",
    ]
    assert (await api.get("/api/agents")).json()["total"] == 0  # a dry run changes nothing

    code, applied, _ = await run(capsys, "apply", "-f", str(path), *options)
    assert code == 0
    assert changes(applied) == planned
    keys = [line.split()[-1] for line in applied if "API key (shown once)" in line]
    tokens = [line.split()[-1] for line in applied if "enrollment token (shown once)" in line]
    assert len(keys) == len(tokens) == 3 and all(k.startswith(("agt_", "gtw_")) for k in keys)
    tunnels = {
        t["domain"] or t["publicPort"]: t for t in (await api.get("/api/tunnels")).json()["items"]
    }
    assert tunnels[2222]["enabled"] is False and tunnels["app.example.com"]["agentName"] == "laptop"

    code, again, _ = await run(capsys, "apply", "-f", str(path), *options)
    assert (code, again) == (0, ["no changes: Control matches the file"])

    exported = tmp_path / "export.yaml"
    code, _, _ = await run(capsys, "export", "-o", str(exported), *options)
    assert code == 0
    text = exported.read_text()
    assert "agt_" not in text and "gtw_" not in text and "kmt_" not in text
    assert not any(key in text for key in keys)
    assert _same(parse(text), parse(FILE))
    code, again, _ = await run(capsys, "apply", "-f", str(exported), *options)
    assert (code, again) == (0, ["no changes: Control matches the file"])

    # change a target and an agent, enable the tcp tunnel, drop the api tunnel and server
    changed = FILE.replace("127.0.0.1:8080", "127.0.0.1:8081").replace(
        "enabled: false", "enabled: true"
    )
    changed = changed.replace("  - server\n", "").replace("agent: server", "agent: laptop")
    changed = changed[: changed.index("  - domain: api.example.com")]
    path.write_text(changed)
    code, dry, _ = await run(capsys, "apply", "-f", str(path), "--dry-run", *options)
    assert changes(dry) == [
        "~ tunnel http app.example.com: target 127.0.0.1:8080 -> 127.0.0.1:8081",
        "~ tunnel tcp 2222: agent server -> laptop, enabled false -> true",
    ]
    code, pruning, _ = await run(capsys, "apply", "-f", str(path), "--dry-run", "--prune", *options)
    planned = changes(pruning)
    assert planned == [
        *changes(dry),
        "- tunnel http api.example.com -> laptop http://127.0.0.1:9000/v1",
        "- agent server",
    ]
    code, applied, _ = await run(capsys, "apply", "-f", str(path), "--prune", *options)
    assert code == 0 and changes(applied) == planned
    code, exported_lines, _ = await run(capsys, "export", *options)
    assert _same(parse("\n".join(exported_lines)), parse(changed))
    code, again, _ = await run(capsys, "apply", "-f", str(path), "--prune", *options)
    assert (code, again) == (0, ["no changes: Control matches the file"])


def _same(a: object, b: object) -> bool:
    """Two Desired values equal but for the lines they came from."""
    from dataclasses import replace

    def strip(d: object) -> object:
        assert hasattr(d, "tunnels")
        return replace(d, tunnels={k: replace(t, line=0) for k, t in d.tunnels.items()})  # type: ignore[type-var]

    return strip(a) == strip(b)


async def test_apply_and_export_enable_and_disable_agents_and_gateways(
    control: RunningControl,
    api: httpx.AsyncClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = ("--control-url", control.url, "--admin-token", ADMIN_TOKEN)
    await api.post("/api/agents", json={"name": "nas"})
    path = tmp_path / "k.yaml"
    text = (
        "version: 1\nagents:\n  - name: laptop\n    enabled: false\n  - nas\n"
        "gateways:\n  - name: edge\n    enabled: false\n"
    )
    path.write_text(text)
    code, dry, _ = await run(capsys, "apply", "-f", str(path), "--dry-run", *options)
    planned = changes(dry)
    assert planned == ["+ agent laptop (disabled)", "+ gateway edge (disabled)"]
    code, applied, _ = await run(capsys, "apply", "-f", str(path), *options)
    assert code == 0 and changes(applied) == planned
    states = {
        (kind, row["name"]): row["enabled"]
        for kind in ("agents", "gateways")
        for row in (await api.get(f"/api/{kind}")).json()["items"]
    }
    assert states == {
        ("agents", "laptop"): False,
        ("agents", "nas"): True,
        ("gateways", "edge"): False,
    }
    code, exported, _ = await run(capsys, "export", *options)
    assert "enabled: false" in "\n".join(exported)
    assert _same(parse("\n".join(exported)), parse(text))
    # enable one, disable another: PATCHes of enabled alone, shown as such by the dry run
    path.write_text(
        text.replace("  - nas\n", "  - name: nas\n    enabled: false\n").replace(
            "edge\n    enabled: false", "edge\n    enabled: true"
        )
    )
    code, dry, _ = await run(capsys, "apply", "-f", str(path), "--dry-run", *options)
    planned = changes(dry)
    assert planned == [
        "~ agent nas: enabled true -> false",
        "~ gateway edge: enabled false -> true",
    ]
    code, applied, _ = await run(capsys, "apply", "-f", str(path), *options)
    assert code == 0 and changes(applied) == planned
    assert (await api.get("/api/agents/nas")).json()["enabled"] is False
    assert (await api.get("/api/gateways/edge")).json()["enabled"] is True
    code, again, _ = await run(capsys, "apply", "-f", str(path), *options)
    assert (code, again) == (0, ["no changes: Control matches the file"])


async def test_apply_refuses_unknown_agents_and_unreachable_control(
    control: RunningControl, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(
        "version: 1\ntunnels:\n  - domain: a.example.com\n    agent: ghost\n    target: 127.0.0.1:1\n"
    )
    code, _, err = await run(
        capsys, "apply", "-f", str(path), "--control-url", control.url, "--admin-token", ADMIN_TOKEN
    )
    assert code == 2 and "line 3: tunnel http a.example.com: agent 'ghost'" in err
    code, _, err = await run(
        capsys,
        "apply",
        "-f",
        str(path),
        "--control-url",
        control.url,
        "--admin-token",
        "wrong-token-0123456789",
    )
    assert code == 1 and "401" in err and "wrong-token" not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "k.yaml: the file is empty"),
        ("version: 1\nagents: [laptop\n", "k.yaml:3: not valid YAML"),
        ("agents: []\n", "k.yaml:1: version: required"),
        ("version: 2\n", "k.yaml:1: version: only version 1"),
        ("version: 1\nagent:\n  - x\n", "k.yaml:2: agent: unknown section"),
        ("version: 1\npolicies: []\n", "k.yaml:2: policies: an access policy goes in its tunnel"),
        ("version: 1\nagents: laptop\n", "k.yaml:2: agents: expected a list"),
        ("version: 1\nagents:\n  - name: Bad Name!\n", "k.yaml:3: agents[0].name:"),
        (
            "version: 1\nagents:\n  - a\n  - name: a\n",
            "k.yaml:4: agents[1].name: 'a' is already declared on line 3",
        ),
        ("version: 1\ngateways:\n  - nmae: e\n", "k.yaml:3: gateways[0].nmae: unknown field"),
        (
            "version: 1\ngateways:\n  - name: e\n    enabled: maybe\n",
            "k.yaml:4: gateways[0].enabled: Input should be a valid boolean",
        ),
        (
            "version: 1\ntunnels:\n  - domain: a.example.com\n    agent: x\n",
            "k.yaml:3: tunnels[0].target: required",
        ),
        (
            "version: 1\ntunnels:\n  - domain: a.example.com\n    agent: x\n    target: 8080\n",
            "k.yaml:5: tunnels[0].target:",
        ),
        (
            "version: 1\ntunnels:\n  - domain: -bad-.example.com\n    agent: x\n    target: 127.0.0.1:1\n",
            "k.yaml:3: tunnels[0].domain:",
        ),
        (
            "version: 1\ntunnels:\n  - protocol: tcp\n    agent: x\n    target: 127.0.0.1:1\n",
            "k.yaml:3: tunnels[0]: a tcp tunnel needs a publicPort",
        ),
        (
            "version: 1\ntunnels:\n  - protocol: tcp\n    public_port: 70000\n    agent: x\n    target: 127.0.0.1:1\n",
            "k.yaml:4: tunnels[0].public_port:",
        ),
        (
            textwrap.dedent("""\
                version: 1
                tunnels:
                  - domain: a.example.com
                    agent: x
                    target: 127.0.0.1:1
                  - domain: A.example.com
                    agent: y
                    target: 127.0.0.1:2
                """),
            "k.yaml:6: tunnels[1]: tunnel http a.example.com is already declared on line 3",
        ),
        (
            "version: 1\ntunnels:\n  - domain: [a]\n",
            "k.yaml:3: tunnels[0].domain: expected a single value",
        ),
        ("- 1\n", "k.yaml:1: the file: expected a mapping"),
    ],
)
def test_bad_files_name_the_line_and_the_field(text: str, message: str) -> None:
    with pytest.raises(FileError) as raised:
        parse(text, "k.yaml")
    assert message in str(raised.value), str(raised.value)
