"""``kakuremichi apply``/``export`` with access policies and replicas, against a real
Control: secrets from the environment and files reach the gateways (hashed) and are
never printed, ``keep`` needs a secret Control holds, ``--replace-secrets`` sends them
again, ``--prune`` removes policies the file no longer gives, the dry run prints exactly
what apply does, and export round-trips replicas, balance, sticky, proxy_protocol and
policies (secrets as ``keep``)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from common import protocol as p
from common.passwords import verify_password
from kakuremichi import cli
from kakuremichi.apply import FileError, parse
from tests.controlserver import ADMIN_TOKEN, RunningControl, connect_client, create

PIN = "pin-4711-zyx"
ALICE = "alice-pässwörd-9q"
OIDC_SECRET = "idp-client-secret-k3j"
BEARER = "bearer-token-0123456789-abc"
NEW_PIN = "pin-0815-qwe"
SECRETS = (PIN, ALICE, OIDC_SECRET, BEARER, NEW_PIN)

FILE = """\
version: 1
agents: [a, b, c]
tunnels:
  - domain: app.example.com
    agent: a
    target: 127.0.0.1:8080
    access:
      ip_allow: [203.0.113.7/24, "2001:db8::1/32"]
      ip_deny: [198.51.100.9]
      password: {env: KKM_TEST_PIN}
      basic_auth:
        - user: alice
          password: {file: alice.txt}
      oidc:
        issuer: https://idp.example.com
        client_id: kakuremichi
        client_secret: {env: KKM_TEST_OIDC}
        allowed_emails: [Ann@Example.com]
        allowed_domains: [Example.ORG]
        allowed_groups: [ops]
      paths:
        - {prefix: /api/, action: bearer, bearer_token: {env: KKM_TEST_BEARER}}
        - {prefix: /public/, action: bypass}
      session_domain: example.com
      session_ttl: 7200
      identity_headers: false
  - domain: web.example.com
    replicas:
      - a
      - {agent: b, weight: 3}
      - {agent: c, role: standby}
    balance: least_connections
    sticky: cookie
    target: 127.0.0.1:8081
  - protocol: tcp
    public_port: 2222
    agent: b
    target: 127.0.0.1:22
    proxy_protocol: v2
    access: {ip_allow: [192.0.2.0/24]}
  - protocol: udp
    public_port: 5353
    replicas: [b, a]
    sticky: client_ip
    proxy_protocol: v2
    target: 127.0.0.1:53
"""


@pytest.fixture
def secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KKM_TEST_PIN", PIN)
    monkeypatch.setenv("KKM_TEST_OIDC", OIDC_SECRET)
    monkeypatch.setenv("KKM_TEST_BEARER", BEARER)
    (tmp_path / "alice.txt").write_text(ALICE + "\n")
    path = tmp_path / "kakuremichi.yaml"
    path.write_text(FILE)
    return path


class Cli:
    """Runs the CLI against one Control and keeps everything it printed."""

    def __init__(self, control: RunningControl, capsys: pytest.CaptureFixture[str]) -> None:
        self.options = ("--control-url", control.url, "--admin-token", ADMIN_TOKEN)
        self.capsys = capsys
        self.printed: list[str] = []

    async def __call__(self, *argv: str) -> tuple[int, list[str], str]:
        code = await asyncio.to_thread(cli.main, [*argv, *self.options])
        captured = self.capsys.readouterr()
        self.printed += [captured.out, captured.err]
        assert "Traceback" not in captured.err
        return code, captured.out.splitlines(), captured.err

    async def applied(self, path: Path, *flags: str) -> list[str]:
        """Dry run, then apply: the same lines; returns them."""
        code, dry, err = await self("apply", "-f", str(path), "--dry-run", *flags)
        assert code == 0, err
        code, done, err = await self("apply", "-f", str(path), *flags)
        assert code == 0, err
        assert changes(done) == changes(dry)
        return changes(done)

    async def unchanged(self, path: Path, *flags: str) -> None:
        code, out, err = await self("apply", "-f", str(path), *flags)
        assert (code, out) == (0, ["no changes: Control matches the file"]), err

    def assert_no_secret(self) -> None:
        text = "\n".join(self.printed)
        for secret in SECRETS:
            assert secret not in text, secret


def changes(lines: list[str]) -> list[str]:
    return [line for line in lines if line[:2] in ("+ ", "~ ", "- ")]


async def tunnels(api: httpx.AsyncClient) -> dict[Any, dict[str, Any]]:
    return {
        t["domain"] or t["publicPort"]: t for t in (await api.get("/api/tunnels")).json()["items"]
    }


async def access_of(api: httpx.AsyncClient, key: Any) -> dict[str, Any]:
    tunnel = (await tunnels(api))[key]
    shown: dict[str, Any] = (await api.get(f"/api/tunnels/{tunnel['id']}/access")).json()
    return shown


async def gateway_policy(
    control: RunningControl, api: httpx.AsyncClient, name: str, seed: int
) -> p.AccessPolicy:
    """The app.example.com policy as a newly connected gateway gets it."""
    gateway = await create(api, "gateway", name)
    peer = await connect_client(control, gateway["apiKey"], "gateway", seed)
    frame = peer.frames[-1]  # the config it got on connecting
    await peer.close()
    await api.delete(f"/api/gateways/{gateway['id']}")
    config = p.parse_gateway_config(frame["data"])
    app = (await tunnels(api))["app.example.com"]["id"]
    (policy,) = [policy for policy in config.policies if policy.tunnel_id == app]
    return policy


async def test_apply_creates_policies_and_replicas_and_export_round_trips(
    control: RunningControl,
    api: httpx.AsyncClient,
    secrets: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = Cli(control, capsys)
    applied = await run.applied(secrets)
    assert applied == [
        "+ agent a",
        "+ agent b",
        "+ agent c",
        "+ tunnel http app.example.com -> a 127.0.0.1:8080",
        "+ access of tunnel http app.example.com: ip_allow 203.0.113.0/24, 2001:db8::/32, "
        "ip_deny 198.51.100.9/32, basic_auth alice, password, "
        "oidc https://idp.example.com client kakuremichi, paths /api/ bearer, /public/ bypass, "
        "paths.bearer_token /api/, session_domain example.com, session_ttl 7200, "
        "identity_headers false",
        "+ tunnel http web.example.com -> a, b:3, c:1:standby 127.0.0.1:8081 "
        "balance least_connections sticky cookie",
        "+ tunnel tcp 2222 -> b 127.0.0.1:22 proxy_protocol v2",
        "+ access of tunnel tcp 2222: ip_allow 192.0.2.0/24",
        "+ tunnel udp 5353 -> b, a 127.0.0.1:53 proxy_protocol v2 sticky client_ip",
    ]
    shown = await access_of(api, "app.example.com")
    assert shown["password"] is True and shown["basicAuth"] == [{"user": "alice"}]
    assert shown["oidc"]["clientSecretSet"] is True
    assert shown["oidc"]["allowedEmails"] == ["ann@example.com"]
    assert shown["oidc"]["allowedDomains"] == ["example.org"]
    assert shown["paths"][0] == {"prefix": "/api/", "action": "bearer", "bearerTokenSet": True}
    assert shown["ipAllow"] == ["203.0.113.0/24", "2001:db8::/32"]
    assert (shown["sessionTtl"], shown["identityHeaders"]) == (7200, False)
    assert (await access_of(api, 2222))["ipAllow"] == ["192.0.2.0/24"]
    rows = await tunnels(api)
    web = rows["web.example.com"]
    assert [(r["agentName"], r["weight"], r["role"]) for r in web["replicas"]] == [
        ("a", 1, "active"),
        ("b", 3, "active"),
        ("c", 1, "standby"),
    ]
    assert (web["balance"], web["sticky"]) == ("least_connections", "cookie")
    assert rows[2222]["proxyProtocol"] == "v2"
    assert [r["agentName"] for r in rows[5353]["replicas"]] == ["b", "a"]
    assert (rows[5353]["sticky"], rows[5353]["proxyProtocol"]) == ("client_ip", "v2")

    # what the gateways get: hashes of exactly the secrets the environment and file gave
    policy = await gateway_policy(control, api, "probe", 7)
    assert policy.password_hash is not None and verify_password(policy.password_hash, PIN)
    assert verify_password(policy.basic_users[0].hash, ALICE)
    assert policy.oidc is not None and policy.oidc.client_secret == OIDC_SECRET
    bearer = next(r for r in policy.paths if r.action == "bearer")
    assert bearer.bearer_hash == hashlib.sha256(BEARER.encode()).hexdigest()

    await run.unchanged(secrets)
    exported = secrets.parent / "export.yaml"
    code, _, _ = await run("export", "-o", str(exported))
    assert code == 0
    text = exported.read_text()
    assert "password: keep" in text and "client_secret: keep" in text
    assert "bearer_token: keep" in text and "weight: 3" in text and "role: standby" in text
    for line in ("balance: least_connections", "sticky: cookie", "proxy_protocol: v2"):
        assert line in text
    assert "round_robin" not in text and "draining" not in text
    await run.unchanged(exported)
    assert parse(text).tunnels.keys() == parse(FILE, base=secrets.parent).tunnels.keys()
    # the exported file describes the same policies (secrets: set, by keep)
    source = parse(FILE, base=secrets.parent)
    for key, tunnel in parse(text).tunnels.items():
        want = source.tunnels[key]
        assert (tunnel.agents, tunnel.balance, tunnel.sticky, tunnel.proxy_protocol) == (
            want.agents,
            want.balance,
            want.sticky,
            want.proxy_protocol,
        )
        assert (tunnel.access is None) == (want.access is None)
        if tunnel.access is not None and want.access is not None:
            assert tunnel.access.view() == want.access.view()
    code, out, _ = await run("export")
    assert "\n".join(out) == text.rstrip("\n")
    run.assert_no_secret()


async def test_export_recreates_everything_on_an_empty_control(
    control: RunningControl,
    api: httpx.AsyncClient,
    secrets: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    run = Cli(control, capsys)
    await run.applied(secrets)
    code, out, _ = await run("export")
    text = "\n".join(out) + "\n"
    for name in ("web.example.com", "app.example.com", 2222, 5353):
        await api.delete(f"/api/tunnels/{(await tunnels(api))[name]['id']}")
    for name in ("a", "b", "c"):
        await api.delete(f"/api/agents/{name}")
    # keep is refused where Control holds nothing: the error names the file and line
    exported = tmp_path / "export.yaml"
    exported.write_text(text)
    code, _, err = await run("apply", "-f", str(exported))
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "password: keep" in t)
    assert code == 2
    assert (
        f"{exported}:{line}: tunnels[0].access.basic_auth[0].password: keep, but Control "
        "holds no basic_auth alice password for tunnel http app.example.com"
    ) in err
    # with the secrets given again, the export makes the same state
    restored = (
        text.replace("password: keep", "password: {file: alice.txt}", 1)
        .replace("password: keep", "password: {env: KKM_TEST_PIN}", 1)
        .replace("client_secret: keep", "client_secret: {env: KKM_TEST_OIDC}")
        .replace("bearer_token: keep", "bearer_token: {env: KKM_TEST_BEARER}")
    )
    exported.write_text(restored)
    assert [t for t in restored.splitlines() if "keep" in t and not t.startswith("#")] == []
    await run.applied(exported)
    await run.unchanged(secrets)
    await run.unchanged(exported)
    policy = await gateway_policy(control, api, "probe", 8)
    assert policy.password_hash is not None and verify_password(policy.password_hash, PIN)
    assert verify_password(policy.basic_users[0].hash, ALICE)
    run.assert_no_secret()


async def test_replace_secrets_prune_and_changes(
    control: RunningControl,
    api: httpx.AsyncClient,
    secrets: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = Cli(control, capsys)
    await run.applied(secrets)
    epoch = (await access_of(api, "app.example.com"))["epoch"]

    # a new PIN in the environment: Control holds one, so it is not sent without the flag
    monkeypatch.setenv("KKM_TEST_PIN", NEW_PIN)
    await run.unchanged(secrets)
    assert await run.applied(secrets, "--replace-secrets") == [
        "~ tunnel http app.example.com: access basic_auth alice password replaced, "
        "password replaced, oidc client_secret replaced, paths /api/ bearer_token replaced",
    ]
    assert (await access_of(api, "app.example.com"))["epoch"] > epoch
    policy = await gateway_policy(control, api, "probe", 9)
    assert policy.password_hash is not None and verify_password(policy.password_hash, NEW_PIN)
    await run.unchanged(secrets)

    # keep where Control holds the secret: nothing to do
    kept = secrets.parent / "kept.yaml"
    kept.write_text(
        FILE.replace("{env: KKM_TEST_PIN}", "keep")
        .replace("{file: alice.txt}", "keep")
        .replace("{env: KKM_TEST_OIDC}", "keep")
        .replace("{env: KKM_TEST_BEARER}", "keep")
    )
    await run.unchanged(kept)
    await run.unchanged(kept, "--replace-secrets")  # keep sends nothing

    # policy edits, replica edits, and settings back to their defaults
    edited = secrets.parent / "edited.yaml"
    edited.write_text(
        FILE.replace("      password: {env: KKM_TEST_PIN}\n", "")
        .replace("ip_deny: [198.51.100.9]", "ip_deny: [198.51.100.9, 198.51.100.10]")
        .replace("        allowed_groups: [ops]\n", "")
        .replace(
            "      - {agent: b, weight: 3}\n      - {agent: c, role: standby}\n", "      - b\n"
        )
        .replace("    balance: least_connections\n", "")
        .replace("    replicas: [b, a]\n", "    agent: a\n")
        .replace("    proxy_protocol: v2\n    access:", "    access:")
    )
    assert await run.applied(edited) == [
        "~ tunnel http app.example.com: access ip_deny 198.51.100.9/32 -> 198.51.100.9/32, "
        "198.51.100.10/32, password removed, oidc.allowed_groups ops -> none",
        "~ tunnel http web.example.com: replicas a, b:3, c:1:standby -> a, b, "
        "balance least_connections -> round_robin",
        "~ tunnel tcp 2222: proxy_protocol v2 -> none",
        "~ tunnel udp 5353: replicas b, a -> a",
    ]
    shown = await access_of(api, "app.example.com")
    assert shown["password"] is False and shown["oidc"]["allowedGroups"] == []
    rows = await tunnels(api)
    assert [(r["agentName"], r["weight"]) for r in rows["web.example.com"]["replicas"]] == [
        ("a", 1),
        ("b", 1),
    ]
    assert rows[5353]["agentName"] == "a" and len(rows[5353]["replicas"]) == 1
    assert rows[2222]["proxyProtocol"] is None
    await run.unchanged(edited)
    _code, out, _ = await run("export")
    exported = secrets.parent / "export.yaml"
    exported.write_text("\n".join(out) + "\n")
    await run.unchanged(exported)

    # an entry without access: its policy stays, unless --prune
    bare = secrets.parent / "bare.yaml"
    text = edited.read_text()
    start = text.index("    access:\n      ip_allow: [203")
    end = text.index("  - domain: web.example.com")
    bare.write_text(text[:start] + text[end:])
    await run.unchanged(bare)
    assert await run.applied(bare, "--prune") == ["- access of tunnel http app.example.com"]
    assert (await access_of(api, "app.example.com"))["enabled"] is False
    assert (await access_of(api, 2222))["enabled"] is True
    await run.unchanged(bare, "--prune")
    run.assert_no_secret()


async def test_bad_access_input_exits_2_without_a_traceback_or_a_secret(
    control: RunningControl,
    secrets: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = Cli(control, capsys)
    bad = secrets.parent / "bad.yaml"
    cases = [
        (
            FILE.replace("session_ttl: 7200", "session_ttl: 7200\n      sesion: x"),
            ":26: tunnels[0].access.sesion: unknown",
        ),
        (FILE.replace("203.0.113.7/24", "203.0.113.7/33"), ":8: tunnels[0].access.ip_allow"),
        (FILE.replace("KKM_TEST_OIDC", "KKM_TEST_UNSET"), "KKM_TEST_UNSET is not set"),
        (FILE.replace("{env: KKM_TEST_PIN}", "4711"), ":10: tunnels[0].access.password: a secret"),
        (
            FILE.replace("session_ttl: 7200", f"session_ttl: {10**40}"),
            ":25: tunnels[0].access.session_ttl",
        ),
        (
            FILE.replace("user: alice", "user: 'ä:lice'"),
            ":12: tunnels[0].access.basic_auth[0].user",
        ),
        (FILE.replace("{file: alice.txt}", "{file: missing.txt}"), "cannot read missing.txt"),
    ]
    for text, message in cases:
        bad.write_text(text)
        code, out, err = await run("apply", "-f", str(bad))
        assert code == 2 and message in err and str(bad) in err, (message, err)
        assert out == []
    run.assert_no_secret()
    assert "4711" not in "\n".join(run.printed)


ENTRY = """\
version: 1
tunnels:
  - domain: app.example.com
    agent: a
    target: 127.0.0.1:1
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (ENTRY + "    access: [1]\n", "k.yaml:6: tunnels[0].access: expected a mapping"),
        (
            ENTRY + "    access:\n      ipAllow: []\n",
            "k.yaml:7: tunnels[0].access.ipAllow: unknown",
        ),
        (
            ENTRY + "    access:\n      ip_allow: [10.0.0.0/8, nonsense]\n",
            "k.yaml:7: tunnels[0].access.ip_allow: 'nonsense' is not an IP",
        ),
        (
            ENTRY + "    access:\n      ip_allow: [\uff11.\uff12.\uff13.\uff14]\n",
            "k.yaml:7: tunnels[0].access.ip_allow:",
        ),
        (
            ENTRY + "    access:\n      ip_allow: 10.0.0.0/8\n",
            "k.yaml:7: tunnels[0].access.ip_allow: Input should be a valid list",
        ),
        (
            ENTRY + "    access:\n      password: {env: KKM_NOT_SET_ANYWHERE}\n",
            "k.yaml:7: tunnels[0].access.password: environment variable KKM_NOT_SET_ANYWHERE",
        ),
        (
            ENTRY + "    access:\n      password: {env: A, file: B}\n",
            "k.yaml:7: tunnels[0].access.password: a secret is keep",
        ),
        (
            ENTRY + "    access:\n      password: 123456\n",
            "k.yaml:7: tunnels[0].access.password: a secret is keep, {env: NAME}, {file: PATH} "
            "or text (this is a int",
        ),
        (
            ENTRY + "    access:\n      password: ''\n",
            "k.yaml:7: tunnels[0].access.password: the secret is empty",
        ),
        (
            ENTRY + "    access:\n      password: x\n      session_ttl: 1e999\n",
            "k.yaml:8: tunnels[0].access.session_ttl: Input should be a valid integer",
        ),
        (
            ENTRY + "    access:\n      session_ttl: 99999999999999999999999999\n",
            "k.yaml:7: tunnels[0].access.session_ttl: Input should be less than or equal",
        ),
        (
            ENTRY + "    access:\n      basic_auth:\n        - user: bob\n",
            "k.yaml:8: tunnels[0].access.basic_auth[0].password: required",
        ),
        (
            ENTRY + "    access:\n      basic_auth:\n        - {user: bob, password: x}\n"
            "        - {user: bob, password: y}\n",
            "k.yaml:9: tunnels[0].access.basic_auth: user 'bob' appears twice",
        ),
        (
            ENTRY + "    access:\n      oidc:\n        issuer: ftp://x\n        client_id: c\n",
            "k.yaml:8: tunnels[0].access.oidc.issuer: String should match pattern",
        ),
        (
            ENTRY + "    access:\n      oidc:\n        issuer: https://x\n        client_id: c\n"
            "        scopes: [email]\n",
            "k.yaml:10: tunnels[0].access.oidc.scopes: scopes must include openid",
        ),
        (
            ENTRY + "    access:\n      oidc: {issuer: https://x, client_id: c, secret: s}\n",
            "k.yaml:7: tunnels[0].access.oidc.secret: unknown field",
        ),
        (
            ENTRY + "    access:\n      paths:\n        - {prefix: /a, action: bearer}\n",
            "k.yaml:8: tunnels[0].access.paths[0].bearer_token: a bearer rule needs a token",
        ),
        (
            ENTRY + "    access:\n      paths:\n        - {prefix: /a, action: deny, "
            "bearer_token: {env: HOME}}\n",
            "k.yaml:8: tunnels[0].access.paths[0].bearer_token: only a bearer rule takes",
        ),
        (
            ENTRY + "    access:\n      paths:\n        - {prefix: /a, action: bearer, "
            "bearer_token: short}\n",
            "k.yaml:8: tunnels[0].access.paths[0].bearer_token: String should have at least 16",
        ),
        (
            ENTRY + "    access:\n      paths:\n        - {prefix: a, action: allow}\n",
            "k.yaml:8: tunnels[0].access.paths[0].prefix: String should match pattern",
        ),
        (
            ENTRY + "    access:\n      session_domain: other.example.com\n",
            "k.yaml:7: tunnels[0].access.session_domain: 'other.example.com' is not the "
            "tunnel's domain",
        ),
        (
            "version: 1\ntunnels:\n  - protocol: tcp\n    public_port: 22\n    agent: a\n"
            "    target: 127.0.0.1:22\n    access:\n      password: x\n",
            "k.yaml:8: tunnels[0].access.password: a tcp tunnel's policy takes IP rules only",
        ),
        (
            ENTRY.replace("    agent: a\n", "    agent: a\n    replicas: [a, b]\n"),
            "k.yaml:5: tunnels[0].replicas: give agent (one agent) or replicas, not both",
        ),
        (
            ENTRY.replace("    agent: a\n", "    replicas:\n      - {agent: a, weight: 2}\n"),
            "k.yaml:5: tunnels[0].replicas: one agent takes all the traffic",
        ),
        (
            ENTRY.replace(
                "    agent: a\n",
                f"    replicas:\n      - a\n      - {{agent: b, weight: {10**30}}}\n",
            ),
            "k.yaml:6: tunnels[0].replicas[1].weight: Input should be less than or equal to 1000",
        ),
        (
            ENTRY.replace(
                "    agent: a\n", "    replicas:\n      - a\n      - {agent: b, role: leader}\n"
            ),
            "k.yaml:6: tunnels[0].replicas[1].role: Input should be 'active' or 'standby'",
        ),
        (
            ENTRY.replace("    agent: a\n", "    replicas: [a, a]\n"),
            "k.yaml:3: tunnels[0]: replicas name the same agent twice",
        ),
        (
            ENTRY.replace("    agent: a\n", "    replicas: []\n"),
            "k.yaml:3: tunnels[0]: replicas must name at least one agent",
        ),
        (
            ENTRY + "    access:\n      ip_allow: &a [*a]\n",
            "k.yaml:7: tunnels[0].access.ip_allow[0][0]",
        ),
        (
            ENTRY + "    access:\n      ip_allow: [&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], "
            "&b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a], &c [*b, *b, *b, *b, *b, *b, *b, *b, "
            "*b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c], [*d, *d, *d, *d, *d, *d]]\n",
            "too deep or too many values",
        ),
        (
            ENTRY + "    access:\n      password: !!python/name:os.system x\n",
            "k.yaml:7: not valid here: could not determine a constructor",
        ),
        (ENTRY + "    balance: random\n", "k.yaml:6: tunnels[0].balance: Input should be"),
        (
            ENTRY.replace("domain: app.example.com", "protocol: tcp\n    public_port: 1")
            + "    sticky: cookie\n",
            "tunnels[0]: a raw tunnel has no cookies",
        ),
        (
            ENTRY + "    proxy_protocol: v2\n",
            "k.yaml:3: tunnels[0]: proxyProtocol is for tcp and udp tunnels",
        ),
    ],
)
def test_bad_access_and_replicas_name_the_line_and_the_field(text: str, message: str) -> None:
    with pytest.raises(FileError) as raised:
        parse(text, "k.yaml", environ={"HOME": "a-home-directory-long-enough"})
    assert message in str(raised.value), str(raised.value)


def test_secret_values_are_never_in_errors_or_reprs(tmp_path: Path) -> None:
    secret = "a-very-secret-value-123"
    (tmp_path / "s.txt").write_text(secret + "\r\n")
    text = ENTRY + "    access:\n      password: {file: s.txt}\n"
    desired = parse(text, str(tmp_path / "k.yaml"))
    access = desired.tunnels["http app.example.com"].access
    assert access is not None and access.password is not None
    assert access.password.value == secret  # trailing newline stripped
    assert secret not in repr(desired)
    too_long = ENTRY + f"    access:\n      password: {secret * 20}\n"
    with pytest.raises(FileError) as raised:
        parse(too_long, "k.yaml")
    assert "at most 256 characters" in str(raised.value) and secret not in str(raised.value)
