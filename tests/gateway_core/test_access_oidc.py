"""OIDC single sign-on through the tunnel with a real provider and a real browser.

Control + gateway (userspace backend) + agent + the sample app on loopback (one event
loop, ``tests/agent/loopback.py``); ``oidc-provider`` (the npm package, run by Node
from ``tests/oidc``, its own signing key made at start) as the identity provider;
Playwright from PyPI driving Debian's chromium, which reaches the tunnels' host names
through ``--host-resolver-rules``.  The flow: unauthenticated → redirected to the
provider → sign in → back at the app with ``X-Auth-Email``; the same session opens a
second tunnel under the session domain; a user outside the allowed list gets 403;
sign-out ends the session; the provider restarted with a new key (a JWKS rotation) still
signs people in.  Screenshots go to ``test-artifacts/access-oidc/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent.loopback import System, running_system
from tests.controlserver import RunningControl
from tests.support import free_port, need

REPO = Path(__file__).resolve().parents[2]
OIDC_DIR = REPO / "tests" / "oidc"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts" / "access-oidc"
SSO = "sso.test"
APP1, APP2, OTHER = f"app1.{SSO}", f"app2.{SSO}", "other.test"
ACCOUNTS = {
    "ann": {"email": "ann@example.com", "groups": ["ops"]},
    "bob": {"email": "bob@example.com", "groups": ["guests"]},
}
WAIT = 30_000  # ms

pytestmark = pytest.mark.slow


class Provider:
    """``tests/oidc/provider.mjs`` as a child process."""

    def __init__(self, port: int, clients: list[dict[str, Any]]) -> None:
        self.port = port
        self.clients = clients
        self.proc: subprocess.Popen[str] | None = None
        self.kid = ""

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        node = shutil.which("node")
        assert node is not None
        self.proc = subprocess.Popen(
            [node, str(OIDC_DIR / "provider.mjs")],
            cwd=OIDC_DIR,
            env={
                **os.environ,
                "OIDC_PORT": str(self.port),
                "OIDC_CLIENTS": json.dumps(self.clients),
                "OIDC_ACCOUNTS": json.dumps(ACCOUNTS),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        assert line.startswith("ready "), line
        self.kid = line.split()[1]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


@contextlib.asynccontextmanager
async def browser_for(system: System) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--headless",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                # the tunnels' names are the gateway on loopback
                f"--host-resolver-rules=MAP *.{SSO} 127.0.0.1, MAP {OTHER} 127.0.0.1",
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()


async def sign_in(page: Any, user: str, name: str) -> None:
    """The provider's development login form, then its consent page."""
    try:
        await page.wait_for_selector("input[name=login]", timeout=WAIT)
    except Exception as exc:
        await shot(page, f"{name}-no-login-form")
        content = (await page.content())[:2000]
        raise AssertionError(f"no login form at {page.url}: {content}") from exc
    await shot(page, f"{name}-provider-login")
    await page.fill("input[name=login]", user)
    await page.fill("input[name=password]", "any password")
    await page.click("button[type=submit]")
    with contextlib.suppress(Exception):
        # consent, the first time this user meets the client
        await page.wait_for_selector("button[autofocus], button[type=submit]", timeout=5000)
        if "/interaction/" in page.url:
            await page.click("button[type=submit]")


async def arrive(page: Any, url: str, name: str) -> None:
    """Wait until the browser is at ``url``; if it never gets there, say where it is."""
    try:
        await page.wait_for_url(url, timeout=WAIT)
    except Exception as exc:
        await shot(page, f"{name}-lost")
        content = (await page.inner_text("body"))[:1000]
        raise AssertionError(f"wanted {url}, at {page.url}: {content}") from exc


async def shot(page: Any, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def seen(page_text: str) -> dict[str, Any]:
    """The sample app's /headers answer as the browser shows it."""
    start = page_text.index("{")
    value: dict[str, Any] = json.loads(page_text[start : page_text.rindex("}") + 1])
    return value


async def test_single_sign_on_through_the_tunnel(
    control: RunningControl, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    node = shutil.which("node")
    need(node is not None, "needs Node (apt-get install nodejs)")
    need((OIDC_DIR / "node_modules" / "oidc-provider").is_dir(), "needs npm install in tests/oidc")
    need(Path(CHROMIUM).exists(), f"needs Debian's chromium at {CHROMIUM}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    http_port = free_port()
    provider = Provider(
        free_port(),
        [
            {
                "client_id": "kakuremichi",
                "client_secret": "a-long-client-secret-0123456789",
                "redirect_uris": [
                    f"http://{host}:{http_port}/.kakuremichi/oidc/callback"
                    for host in (APP1, APP2, OTHER)
                ],
                "token_endpoint_auth_method": "client_secret_basic",
            }
        ],
    )
    await provider.start()
    try:
        async with running_system(
            control, api, tmp_path, gateway_options={"http_port": http_port}
        ) as system:
            await _flow(system, provider, http_port)
    finally:
        provider.stop()


async def _flow(system: System, provider: Provider, port: int) -> None:
    target = f"http://127.0.0.1:{system.app.port}"
    tunnels = {}
    for host in (APP1, APP2, OTHER):
        tunnels[host] = (await system.tunnel(domain=host, target=target))["id"]
        await system.wait_status(host, 200, 30, "/headers")
    oidc = {
        "issuer": provider.issuer,
        "clientId": "kakuremichi",
        "clientSecret": "a-long-client-secret-0123456789",
        "scopes": ["openid", "email", "profile", "groups"],
        "allowedEmails": ["ann@example.com"],
    }
    for host in (APP1, APP2):
        response = await system.api.put(
            f"/api/tunnels/{tunnels[host]}/access", json={"oidc": oidc, "sessionDomain": SSO}
        )
        assert response.status_code == 200, response.text
    response = await system.api.put(f"/api/tunnels/{tunnels[OTHER]}/access", json={"oidc": oidc})
    assert response.status_code == 200, response.text
    for host in (APP1, APP2, OTHER):  # the policy is in force at the gateway
        await system.wait_status(host, 401, 10, "/headers")

    async with browser_for(system) as browser:
        context = await browser.new_context()
        page = await context.new_page()
        # 1. unauthenticated -> the provider -> back at the app, with the identity
        await page.goto(f"http://{APP1}:{port}/headers", timeout=WAIT)
        assert page.url.startswith(provider.issuer), page.url
        await sign_in(page, "ann", "01")
        await arrive(page, f"http://{APP1}:{port}/headers", "01")
        await shot(page, "02-app1-signed-in")
        headers = seen(await page.inner_text("body"))
        assert headers["x-auth-email"] == "ann@example.com"
        assert headers["x-auth-user"] == "ann" and headers["x-auth-groups"] == "ops"
        assert "kkm_sso" not in (headers.get("cookie") or "")  # the session stays at the gateway
        # 2. the same session opens the second tunnel under the session domain at once
        await page.goto(f"http://{APP2}:{port}/headers", timeout=WAIT)
        assert page.url == f"http://{APP2}:{port}/headers", page.url
        assert seen(await page.inner_text("body"))["x-auth-email"] == "ann@example.com"
        await shot(page, "03-app2-same-session")
        # ... but not a tunnel outside it: that one sends the browser to sign in again
        cookies = {c["name"]: c for c in await context.cookies()}
        outside = await system.http.get(
            "/headers",
            headers={
                "Host": OTHER,
                "Accept": "text/html",
                "Cookie": f"kkm_sso={cookies['kkm_sso']['value']}",
            },
        )
        assert outside.status_code == 302
        assert "/.kakuremichi/oidc/start" in outside.headers["location"]
        # a policy change pushed while the session is open takes effect within 1 s
        sso_cookie = {"Host": APP2, "Cookie": f"kkm_sso={cookies['kkm_sso']['value']}"}
        assert (await system.http.get("/headers", headers=sso_cookie)).status_code == 200
        narrowed = {**oidc, "allowedEmails": ["nobody@example.com"]}
        loop = asyncio.get_running_loop()
        changed = loop.time()
        response = await system.api.put(
            f"/api/tunnels/{tunnels[APP2]}/access", json={"oidc": narrowed, "sessionDomain": SSO}
        )
        assert response.status_code == 200, response.text
        while (await system.http.get("/headers", headers=sso_cookie)).status_code == 200:
            assert loop.time() - changed < 1.0, "the narrowed policy took over a second"
            await asyncio.sleep(0.02)
        response = await system.api.put(
            f"/api/tunnels/{tunnels[APP2]}/access", json={"oidc": oidc, "sessionDomain": SSO}
        )
        assert response.status_code == 200, response.text
        # 3. sign-out ends the session, replaying its cookie does not bring it back
        assert cookies["kkm_sso"]["domain"].lstrip(".") == SSO
        assert cookies["kkm_sso"]["httpOnly"] is True
        await page.goto(f"http://{APP1}:{port}/.kakuremichi/logout", timeout=WAIT)
        await shot(page, "04-signed-out")
        replay = await system.http.get(
            "/headers",
            headers={"Host": APP2, "Cookie": f"kkm_sso={cookies['kkm_sso']['value']}"},
        )
        assert replay.status_code == 401
        await context.close()

        # 4. a user outside the allowed list: 403 from the gateway, no session
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(f"http://{APP1}:{port}/headers", timeout=WAIT)
        await sign_in(page, "bob", "05")
        await page.wait_for_selector("text=may not reach", timeout=WAIT)
        await shot(page, "06-not-allowed")
        assert not any(c["name"] == "kkm_sso" for c in await context.cookies())
        await context.close()

        # 5. the provider restarts with a new signing key: sign-in still works (the
        #    gateway fetches the key set again for the unknown key id)
        old_kid = provider.kid
        provider.stop()
        await provider.start()
        assert provider.kid != old_kid
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(f"http://{APP2}:{port}/headers", timeout=WAIT)
        await sign_in(page, "ann", "07")
        await arrive(page, f"http://{APP2}:{port}/headers", "07")
        assert seen(await page.inner_text("body"))["x-auth-email"] == "ann@example.com"
        await shot(page, "08-after-key-rotation")
        await context.close()

        # 6. a provider that cannot be reached: fail closed, with a page that says so
        gone = {**oidc, "issuer": f"http://127.0.0.1:{free_port()}"}
        response = await system.api.put(
            f"/api/tunnels/{tunnels[OTHER]}/access", json={"oidc": gone}
        )
        assert response.status_code == 200, response.text
        await asyncio.sleep(1.0)  # the push reaches the gateway
        context = await browser.new_context()
        page = await context.new_page()
        answer = await page.goto(f"http://{OTHER}:{port}/headers", timeout=WAIT)
        assert answer is not None and answer.status == 503
        assert "cannot be reached" in await page.inner_text("body")
        await shot(page, "09-provider-unreachable")
        await context.close()
