"""Control over HTTPS (``control.tls``) with a test CA made here: a gateway and an agent
connect through it and carry a tunnel; a client that does not trust the CA is refused
with an error saying so; enrollment tokens pin Control's key (a Control with another
key is refused before the API key is sent); the certificate is reloaded when its files
change, for new connections only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from common import __version__
from common.controlclient import (
    ControlClient,
    ControlClientSettings,
    client_ssl_context,
    control_target,
)
from common.token import EnrollmentToken, decode, spki_pin
from control.tls import load_leaf
from tests.agent.loopback import running_system
from tests.controlserver import ADMIN_TOKEN, create, public_key
from tests.tlsca import HttpsControl, TestCa

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ca() -> TestCa:
    return TestCa()


@pytest.fixture
def ca_file(ca: TestCa, tmp_path: Path) -> Path:
    return ca.write_ca(tmp_path / "ca.pem")


@pytest.fixture
async def https_control(ca: TestCa, tmp_path: Path) -> AsyncIterator[HttpsControl]:
    cert, key = tmp_path / "control.crt", tmp_path / "control.key"
    ca.issue(cert, key)
    server = HttpsControl(tmp_path / "control.db", cert, key)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def https_api(https_control: HttpsControl, ca_file: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=https_control.url,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        verify=client_ssl_context(str(ca_file)),
        timeout=10,
    ) as client:
        yield client


def client(url: str, api_key: str, kind: str, **tls: object) -> ControlClient:
    return ControlClient(
        ControlClientSettings(
            control_url=url,
            api_key=api_key,
            client_type=kind,
            public_key=public_key(7),
            version=f"test/{__version__}",
            public_ip="192.0.2.1" if kind == "gateway" else None,
            wireguard_port=51820 if kind == "gateway" else None,
            backoff_min=0.05,
            backoff_max=0.1,
            **tls,  # type: ignore[arg-type]
        )
    )


@contextlib.asynccontextmanager
async def running(c: ControlClient) -> AsyncIterator[ControlClient]:
    task = asyncio.get_running_loop().create_task(c.run())
    try:
        yield c
    finally:
        await c.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: object, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_gateway_and_agent_connect_through_https_and_carry_a_tunnel(
    https_control: HttpsControl, https_api: httpx.AsyncClient, ca_file: Path, tmp_path: Path
) -> None:
    trust = client_ssl_context(str(ca_file))
    async with running_system(
        https_control,
        https_api,
        tmp_path,
        gateway_options={"control_ssl": trust},
        control_ssl=trust,
    ) as system:
        assert system.agent.client.url.startswith("wss://")
        await until(system.gateway.client.connected.is_set)
        await until(system.agent.client.connected.is_set)
        await system.tunnel(domain="app.test", target=f"127.0.0.1:{system.app.port}")
        await system.wait_status("app.test", 200, within=15)


async def test_a_client_that_does_not_trust_the_ca_is_refused_with_a_clear_error(
    https_control: HttpsControl, https_api: httpx.AsyncClient, tmp_path: Path
) -> None:
    row = await create(https_api, "agent", "untrusting")
    other = TestCa("some other CA").write_ca(tmp_path / "other.pem")
    for context in (client_ssl_context(str(other)), client_ssl_context()):  # wrong CA, system
        c = client(https_control.url, row["apiKey"], "agent", ssl_context=context)
        async with running(c):
            await until(lambda c=c: c.attempts >= 2 and c.last_error)
            assert not c.connected.is_set()
        assert "Control's certificate is not trusted" in c.last_error, c.last_error
        assert "--control-ca" in c.last_error
    assert not (await https_api.get(f"/api/agents/{row['id']}")).json()["online"]


async def test_the_token_pins_controls_key_and_another_key_is_refused(
    https_control: HttpsControl, https_api: httpx.AsyncClient, ca: TestCa, tmp_path: Path
) -> None:
    row = await create(https_api, "agent", "pinned")
    token = decode(row["token"])
    assert token.api_key == row["apiKey"]
    assert token.control_url == https_control.url
    assert token.pin == https_control.tls.pin == spki_pin(load_leaf(https_control.tls.cert_file))
    # the pin alone is trust enough: no CA is given
    target = control_target({"token": row["token"]}, "agent")
    assert target.pin == token.pin
    c = client(target.url, target.api_key, "agent", ssl_context=target.ssl_context, pin=target.pin)
    async with running(c):
        await until(c.connected.is_set)
    # the same token against a Control whose certificate (same CA, same names) has
    # another key: refused before auth, so the key never reaches it
    ca.issue(tmp_path / "other.crt", tmp_path / "other.key")
    other = HttpsControl(tmp_path / "other.db", tmp_path / "other.crt", tmp_path / "other.key")
    await other.start()
    try:
        forged = EnrollmentToken(other.url, row["apiKey"], token.pin).encode()
        target = control_target({"token": forged}, "agent")
        c = client(
            target.url, target.api_key, "agent", ssl_context=target.ssl_context, pin=target.pin
        )
        async with running(c):
            await until(lambda: c.attempts >= 2 and c.last_error)
            assert not c.connected.is_set()
        assert "is not the one the enrollment token pins" in c.last_error, c.last_error
        assert row["apiKey"] not in c.last_error
        hub = other.app.state.hub
        assert not hub.connections  # nothing authenticated there
    finally:
        await other.stop()


async def test_the_certificate_is_reloaded_for_new_connections(
    https_control: HttpsControl, https_api: httpx.AsyncClient, ca: TestCa, ca_file: Path
) -> None:
    tls = https_control.tls
    row = await create(https_api, "agent", "reloaded")
    before = tls.pin
    keep = client(
        https_control.url, row["apiKey"], "agent", ssl_context=client_ssl_context(str(ca_file))
    )
    async with running(keep):
        await until(keep.connected.is_set)
        first_ws = keep._ws
        # a broken pair is refused and the old certificate keeps serving
        tls.key_file.write_text("not a key")
        await asyncio.sleep(0.5)
        assert tls.pin == before and tls.reloads == 0
        assert (await https_api.get("/healthz")).status_code == 200
        ca.issue(tls.cert_file, tls.key_file)  # a new key
        await until(lambda: tls.reloads == 1, within=5)
        assert tls.pin != before
        # a new connection sees the new certificate; the open one was not touched
        context = client_ssl_context(str(ca_file))
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", https_control.port, ssl=context, server_hostname="localhost"
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        from common.token import spki_pin_of_der

        assert spki_pin_of_der(der) == tls.pin
        assert keep.connected.is_set() and keep._ws is first_ws
    # a token issued now pins the new key
    rotated = (await https_api.post(f"/api/agents/{row['id']}/rotate-key")).json()
    assert decode(rotated["token"]).pin == tls.pin


def test_self_signed_control_token_and_agent_from_the_command_line(tmp_path: Path) -> None:
    """``kakuremichi control --tls-self-signed``: the admin CLI trusts it with
    ``--control-ca`` (its own certificate), ``agent create`` prints a token, and
    ``kakuremichi agent`` started with only KAKUREMICHI_TOKEN comes online."""
    from tests.support import free_port

    port = free_port()
    url = f"https://127.0.0.1:{port}"
    env = {**os.environ, "KAKUREMICHI_ADMIN_TOKEN": ADMIN_TOKEN}
    env.pop("KAKUREMICHI_TOKEN", None)
    command = [sys.executable, "-m", "kakuremichi.cli"]
    control = subprocess.Popen(
        [*command, "control", "--host", "127.0.0.1", "--port", str(port), "--data-dir",
         str(tmp_path / "control"), "--tls-self-signed", "true", "--public-url", url],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    agent = None
    try:
        cert = tmp_path / "control" / "tls" / "control.crt"
        admin = [*command, "admin"]
        options = ["--control-url", url, "--control-ca", str(cert)]
        for _ in range(200):
            done = subprocess.run([*admin, "agent", "list", *options], env=env,
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode == 0:
                break
            assert "configuration error" not in done.stderr or "cannot load" in done.stderr
            assert control.poll() is None, control.communicate()[0]
            import time

            time.sleep(0.1)
        assert done.returncode == 0, done.stderr
        # without --control-ca the self-signed certificate is refused, and said so
        refused = subprocess.run([*command, "admin", "agent", "list", "--control-url", url],
                                 env=env, capture_output=True, text=True)  # fmt: skip
        assert refused.returncode == 1
        assert "certificate is not trusted" in refused.stderr and "--control-ca" in refused.stderr
        created = subprocess.run([*admin, "agent", "create", "cli-agent", *options],
                                 env=env, capture_output=True, text=True, check=True)  # fmt: skip
        token = next(w for w in created.stdout.split() if w.startswith("kmt_"))
        assert f"KAKUREMICHI_TOKEN='{token}' kakuremichi agent" in created.stdout
        agent_env = {**env, "KAKUREMICHI_TOKEN": token}
        agent = subprocess.Popen(
            [*command, "agent", "--data-dir", str(tmp_path / "agent"), "--wireguard-host", "127.0.0.1"],
            env=agent_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for _ in range(300):
            listed = subprocess.run([*admin, "agent", "get", "cli-agent", *options, "--json"],
                                    env=env, capture_output=True, text=True, check=True)  # fmt: skip
            if '"online": true' in listed.stdout:
                break
            assert agent.poll() is None, agent.communicate()[0]
            import time

            time.sleep(0.1)
        else:
            raise AssertionError("the agent never came online")
        agent.terminate()
        log = agent.communicate(timeout=20)[0]
        assert agent.returncode == 0, log
        assert token not in log and token[4:40] not in log
    finally:
        for process in (agent, control):
            if process is not None and process.poll() is None:
                process.terminate()
                process.communicate(timeout=20)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"token": "kmt_!!!"}, "damaged"),
        ({"token": "agt_notatoken"}, "not an enrollment token"),
        (
            {"token": EnrollmentToken("https://c.example", "gtw_" + "a" * 40).encode()},
            "gateway's token",
        ),
        (
            {
                "token": EnrollmentToken("https://c.example", "agt_" + "a" * 40).encode(),
                "api_key": "agt_" + "b" * 40,
            },
            "give one of them",
        ),
        (
            {"token": EnrollmentToken("http://c.example", "agt_" + "a" * 40, "A" * 43).encode()},
            "not https://",
        ),
        (
            {
                "control_url": "https://c.example",
                "api_key": "agt_x",
                "control_ca": "/nonexistent.pem",
            },
            "--control-ca",
        ),
        ({"control_url": "https://c.example"}, "--api-key"),
        ({"api_key": "agt_" + "a" * 40}, "--control-url"),
    ],
)
def test_control_settings_errors_name_the_setting_and_never_quote_the_token(
    values: dict[str, str], message: str
) -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        control_target(values, "agent")
    assert message in str(raised.value)
    token = values.get("token", "")
    assert not token or token[4:] not in str(raised.value)


def test_plain_http_to_a_remote_control_warns(caplog: pytest.LogCaptureFixture) -> None:
    control_target(
        {"control_url": "http://control.example.com", "api_key": "agt_" + "a" * 40}, "agent"
    )
    assert "unencrypted" in caplog.text
    caplog.clear()
    control_target({"control_url": "http://127.0.0.1:7700", "api_key": "agt_" + "a" * 40}, "agent")
    control_target(
        {"control_url": "https://control.example.com", "api_key": "agt_" + "a" * 40}, "agent"
    )
    assert "unencrypted" not in caplog.text


def test_ssl_default_context_is_verifying() -> None:
    context = client_ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    pinned = client_ssl_context(pin="A" * 43)
    assert pinned.verify_mode == ssl.CERT_NONE
