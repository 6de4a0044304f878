"""The dashboard in a real browser: Playwright (PyPI) driving Debian's chromium against a
real Control, gateway (userspace WireGuard) and agent (started from the command the
dashboard showed), all on loopback.

The first-hour flow of issue 16, in one test because each step needs the one before:
setup link -> password -> a gateway and an agent created -> the agent's command copied
with the copy button -> the agent started with exactly that command -> it turns online
on the open page without a reload -> a tunnel created -> a request through it shows up
in the tunnel's counters -> disabled: 503 -> deleted: 404.  Then what must be refused:
XSS payloads in every name field render inert, a form without its CSRF token is
refused, a browser without the session cookie sees only the sign-in page.

Screenshots of every page go to ``test-artifacts/dashboard/`` (gitignored; CI keeps
it).  One browser for the module; the time spent waiting is bounded everywhere.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from common import token
from control.web import auth
from gateway.runtime import Gateway, GatewaySettings
from tests.agent.loopback import AppServer
from tests.controlserver import RunningControl
from tests.support import free_port, need

CHROMIUM = "/usr/bin/chromium"
#: launch flags for a root user in a container, and nothing that phones home
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "dashboard"
PASSWORD = "correct horse battery"
#: fits the 63 characters name fields take
XSS = '"><img src=x onerror=window.__xss=1><b>'
DOMAIN = "app.dash.test"
WAIT = 30_000  # ms: the longest any one step may take

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Setup:
    control: RunningControl
    browser: Any
    tmp: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    need(Path(CHROMIUM).exists(), f"needs Debian's chromium at {CHROMIUM}")
    try:
        from playwright.async_api import async_playwright
    except ImportError:  # pragma: no cover
        need(False, "needs playwright (pip install -e '.[test]')")
        raise
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    tmp = tmp_path_factory.mktemp("dashboard")
    control = RunningControl(tmp / "control.db")
    control.overrides["listen_url"] = control.url
    await control.start()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield Setup(control, browser, tmp)
        finally:
            await browser.close()
            await control.stop()


#: what every page must give assistive technology: a language, a title, one h1, a
#: label for every control, a text for every image, a name for every button and link
A11Y = """() => {
  const problems = [];
  if (!document.documentElement.lang) problems.push("no lang");
  if (!document.title.trim()) problems.push("no title");
  if (document.querySelectorAll("h1").length !== 1) problems.push("not one h1");
  for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea")) {
    if (!el.labels || el.labels.length === 0) problems.push("unlabelled " + (el.id || el.name));
  }
  for (const img of document.querySelectorAll("img")) {
    if (!img.hasAttribute("alt")) problems.push("image without alt " + img.src);
  }
  for (const el of document.querySelectorAll("button, a[href]")) {
    if (!(el.getAttribute("aria-label") || el.textContent).trim()) problems.push("unnamed " + el.outerHTML.slice(0, 80));
  }
  return problems;
}"""


async def shot(page: Any, name: str) -> None:
    """Save the page (``test-artifacts/dashboard/NAME.png``) and check its basics."""
    problems = await page.evaluate(A11Y)
    assert problems == [], (name, problems)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def copy_block(page: Any, block: str) -> str:
    """Press the copy button of a command block; what the clipboard then holds."""
    await page.click(f'button[data-copy="{block}"]')
    await page.wait_for_function(
        f"document.querySelector('button[data-copy=\"{block}\"]').textContent === 'Copied'",
        timeout=WAIT,
    )
    copied: str = await page.evaluate("navigator.clipboard.readText()")
    return copied


async def through(port: int, host: str, want: int, within: float = 30.0) -> httpx.Response:
    """GET / through the gateway until it answers ``want`` (bounded)."""
    last: object = None
    async with httpx.AsyncClient(timeout=5) as client:
        async with asyncio.timeout(within):
            while True:
                try:
                    response = await client.get(f"http://127.0.0.1:{port}/", headers={"Host": host})
                    if response.status_code == want:
                        return response
                    last = response.status_code
                except httpx.HTTPError as exc:
                    last = exc
                await asyncio.sleep(0.2)
    raise AssertionError(last)  # pragma: no cover (the timeout raises first)


def agent_process(command: str, tmp: Path) -> subprocess.Popen[bytes]:
    """Run the command the dashboard showed, as a user would paste it: the program is
    this environment's ``kakuremichi``; only the state directory, the loopback
    WireGuard socket and a short health interval are added."""
    argv = shlex.split(command)
    assert argv[:2] == ["kakuremichi", "agent"], argv
    program = str(Path(sys.executable).parent / "kakuremichi")
    extra = ["--data-dir", str(tmp / "agent"), "--wireguard-host", "127.0.0.1"]
    extra += ["--health-interval", "1", "--log-format", "json"]
    with (tmp / "agent.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen([program, *argv[1:], *extra], stdout=log, stderr=subprocess.STDOUT)


async def test_the_first_hour(setup: Setup) -> None:
    control, tmp = setup.control, setup.tmp
    # bypass_csp: Playwright's polling predicates are evaluated strings, which the
    # dashboard's CSP forbids (no 'unsafe-eval'); the XSS checks thus rest on escaping alone
    context = await setup.browser.new_context(
        viewport={"width": 1280, "height": 900}, bypass_csp=True
    )
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=control.url)
    page = await context.new_page()
    dialogs: list[str] = []
    pending: set[asyncio.Future[None]] = set()

    def on_dialog(dialog: Any) -> None:
        dialogs.append(f"{dialog.type}: {dialog.message}")
        pending.add(asyncio.ensure_future(dialog.accept()))

    page.on("dialog", on_dialog)
    app = await AppServer().start()
    gateway: Gateway | None = None
    agent: subprocess.Popen[bytes] | None = None
    try:
        # -- first run: the printed link, a password, signed in --------------------------
        link = re.search(r"(http://\S+/setup\?token=stp_\S+)", "\n".join(control.announced))
        assert link, control.announced
        await page.goto(link.group(1))
        await shot(page, "01-setup")
        await page.fill("#username", "alice")
        await page.fill("#password", PASSWORD)
        await page.fill("#confirm", PASSWORD)
        await page.click("button[type=submit]")
        await page.wait_for_url(control.url + "/", timeout=WAIT)
        assert await page.inner_text("h1") == "Overview"
        await shot(page, "02-overview-empty")

        # -- a gateway, started in this process with its key ---------------------------
        await page.goto(control.url + "/gateways")
        await page.fill("#name", "edge-1")
        await page.click("form[action='/gateways'] button[type=submit]")
        key = (await page.inner_text("#api-key")).strip()
        assert key.startswith("gtw_")
        await shot(page, "03-gateway-created")
        http_port = free_port()
        gateway = Gateway(
            GatewaySettings(
                control_url=control.url,
                api_key=key,
                data_dir=tmp / "gateway",
                public_ip="127.0.0.1",
                wireguard_port=free_port(),
                backend="userspace",
                host="127.0.0.1",
                http_port=http_port,
                https_port=0,
                admin_host="127.0.0.1",
                admin_port=free_port(),
                stats_interval=1.0,
            )
        )
        await gateway.start()
        await page.goto(control.url + "/gateways")
        await page.wait_for_function(
            "document.querySelector('[data-presence^=\"gateway:\"]').textContent === 'online'",
            timeout=WAIT,
        )
        await shot(page, "03b-gateway-online")

        # -- an agent: its key once, the command copied with the button ------------------
        await page.goto(control.url + "/agents")
        await shot(page, "04-agents-empty")
        await page.fill("#name", "laptop")
        await page.click("form[action='/agents'] button[type=submit]")
        await page.wait_for_selector("#cmd-cli", timeout=WAIT)
        await shot(page, "05-agent-created")
        command = await copy_block(page, "cmd-cli")
        agent_key = (await page.inner_text("#api-key")).strip()
        assert command == (await page.inner_text("#cmd-cli")).strip()
        # kakuremichi agent --token kmt_…: Control's URL and the key in one string
        argv = shlex.split(command)
        assert argv[:3] == ["kakuremichi", "agent", "--token"] and len(argv) == 4
        enrollment = token.decode(argv[3])
        assert (enrollment.control_url, enrollment.api_key) == (control.url, agent_key)
        long = await copy_block(page, "cmd-long")
        assert long == f"kakuremichi agent --control-url {control.url} --api-key {agent_key}"
        docker = await copy_block(page, "cmd-docker")
        assert docker.startswith("docker run") and f"KAKUREMICHI_TOKEN={argv[3]}" in docker
        assert f"KAKUREMICHI_TOKEN: {argv[3]}" in await page.inner_text("#cmd-compose")
        # shown once: the agent's own page never shows the key again
        await page.click("text=Go to laptop")
        await page.wait_for_url(re.compile(r".*/agents/[0-9a-f-]{36}$"), timeout=WAIT)
        agent_id = page.url.rsplit("/", 1)[1]
        await shot(page, "05b-agent-page")
        assert agent_key not in await page.content()

        # -- the agent starts from that command; the open page turns it online ----------
        await page.goto(control.url + "/")
        badge = page.locator(f'[data-presence="agent:{agent_id}"]')
        assert (await badge.inner_text()).strip() == "offline"
        await page.evaluate("window.__sameDocument = true")
        await page.wait_for_function(
            "document.getElementById('live-status').textContent.startsWith('Live')",
            timeout=WAIT,
        )
        agent = agent_process(command, tmp)
        try:
            await page.wait_for_function(
                f"document.querySelector('[data-presence=\"agent:{agent_id}\"]').textContent"
                " === 'online'",
                timeout=2 * WAIT,  # a new process: its start-up on a busy machine too
            )
        except Exception as exc:
            online = control.app.state.hub.presence("agent", agent_id)
            log = (tmp / "agent.log").read_text(errors="replace")[-3000:]
            raise AssertionError(
                f"not online on the page; hub says {online}; agent log:\n{log}"
            ) from exc
        assert await page.evaluate("window.__sameDocument === true")  # no reload happened
        counted = page.locator('[data-online-count="agent"]')
        assert await counted.inner_text() == "1"
        await shot(page, "06-overview-agent-online")

        # -- a tunnel, and a request through it in its counters --------------------------
        await page.goto(control.url + "/tunnels/new?agent=laptop")
        await page.select_option("#protocol", "http")
        await page.fill("#domain", DOMAIN)
        await page.fill("#target", f"http://127.0.0.1:{app.port}")
        await shot(page, "07-tunnel-form")
        await page.click("button:has-text('Create tunnel')")
        await page.wait_for_url(
            re.compile(r".*/tunnels/[0-9a-f-]{36}\?notice=created$"), timeout=WAIT
        )
        tunnel_id = page.url.split("/tunnels/")[1].split("?")[0]
        response = await through(http_port, DOMAIN, 200)
        assert "kakuremichi" in response.text.lower() or response.text
        requests = page.locator(f'[data-traffic="{tunnel_id}"][data-field="requests"]')
        await page.wait_for_function(
            f'Number(document.querySelector(\'[data-traffic="{tunnel_id}"]'
            '[data-field="requests"]\').textContent) >= 1',
            timeout=WAIT,
        )
        assert int(await requests.inner_text()) >= 1
        health = page.locator(f'[data-health="{tunnel_id}"]')
        await page.wait_for_function(
            f"document.querySelector('[data-health=\"{tunnel_id}\"]').textContent === 'healthy'",
            timeout=WAIT,
        )
        assert await health.inner_text() == "healthy"
        await page.reload()  # the chart is drawn from the same buckets
        chart = await page.evaluate(f"fetch('/tunnels/{tunnel_id}/chart.svg').then(r => r.text())")
        assert "<svg" in chart and re.search(r"[1-9]\d* requests", chart)
        await shot(page, "08-tunnel-traffic")
        await page.goto(control.url + "/tunnels")
        await shot(page, "08b-tunnels")
        await page.goto(control.url + f"/tunnels/{tunnel_id}/edit")
        assert await page.input_value("#domain") == DOMAIN
        await shot(page, "08c-tunnel-edit")
        await page.goto(control.url + f"/tunnels/{tunnel_id}")

        # -- disabled: 503; deleted: 404 -------------------------------------------------
        await page.click("button:has-text('Disable')")
        await page.wait_for_url(re.compile(r".*notice=disabled$"), timeout=WAIT)
        await through(http_port, DOMAIN, 503)
        await shot(page, "09-tunnel-disabled")
        await page.click("button:has-text('Delete')")
        await page.wait_for_url(re.compile(r".*/tunnels\?notice=deleted$"), timeout=WAIT)
        assert any(d.startswith("confirm:") for d in dialogs)
        await through(http_port, DOMAIN, 404)
        await shot(page, "10-tunnels-after-delete")
        await page.goto(control.url + "/audit")
        text = await page.inner_text("main")
        for action in (
            "tunnel.delete",
            "tunnel.disable",
            "tunnel.create",
            "agent.create",
            "gateway.create",
            "session.login",
            "user.create",
        ):
            assert action in text
        await shot(page, "11-audit")
        await page.goto(control.url + "/users")
        await shot(page, "12-users")
        phone = await setup.browser.new_context(
            viewport={"width": 390, "height": 844},
            bypass_csp=True,
            is_mobile=True,
            has_touch=True,
            storage_state=await context.storage_state(),
        )
        small = await phone.new_page()
        await small.goto(control.url + "/")
        width = await small.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the overview is {width}px wide on a 390px phone"
        await shot(small, "13-overview-phone")
        await phone.close()
        assert not [d for d in dialogs if not d.startswith("confirm:")], dialogs
    finally:
        await context.close()
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        if gateway is not None:
            await gateway.stop()
        await app.stop()


async def test_what_must_be_refused(setup: Setup) -> None:
    control = setup.control
    context = await setup.browser.new_context(bypass_csp=True)  # escaping alone must hold
    page = await context.new_page()
    alerts: list[str] = []
    pending: set[asyncio.Future[None]] = set()
    page.on(
        "dialog",
        lambda d: (alerts.append(d.message), pending.add(asyncio.ensure_future(d.dismiss()))),
    )
    # a user of its own, so this test stands alone (made as the users page makes one)
    admins = control.app.state.dashboard.admins
    await admins.create_user("bob", await auth.hash_password(PASSWORD))
    try:
        # signed in with the keyboard alone: the user name has the focus, Tab, Enter
        await page.goto(control.url + "/login")
        assert await page.evaluate("document.activeElement.id") == "username"
        await page.keyboard.type("bob")
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.id") == "password"
        await page.keyboard.type(PASSWORD)
        async with page.expect_navigation(timeout=WAIT):
            await page.keyboard.press("Enter")
        await page.wait_for_url(control.url + "/", timeout=WAIT)
        # and the first Tab on a page reaches the skip link
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.className") == "skip"

        async def inert(url: str, name: str) -> None:
            """The page shows the payload as text: no element, no script run."""
            assert await page.evaluate("window.__xss === undefined"), url
            assert await page.locator("img[src=x]").count() == 0, url
            await shot(page, name)

        # every name field, with the payload: refused, and echoed back as text
        for path, field in (("/agents", "#name"), ("/gateways", "#name"), ("/users", "#username")):
            await page.goto(control.url + path)
            await page.fill(field, XSS)
            if path == "/users":
                await page.fill("#new-password", PASSWORD)
            async with page.expect_navigation(timeout=WAIT):
                await page.locator(field).evaluate("e => e.form.requestSubmit()")
            assert XSS in await page.locator(field).input_value()
            await inert(path, f"20-xss{path.replace('/', '-')}")
        await page.goto(control.url + "/agents")
        await page.fill("#name", "victim")
        await page.click("form[action='/agents'] button[type=submit]")
        await page.wait_for_selector("#api-key", timeout=WAIT)
        await page.goto(control.url + "/tunnels/new?agent=victim")
        await page.fill("#domain", XSS)
        await page.fill("#target", "http://127.0.0.1:9/<script>window.__xss=1</script>")
        async with page.expect_navigation(timeout=WAIT):
            await page.click("button:has-text('Create tunnel')")
        await inert("/tunnels/new", "21-xss-tunnel")
        # a target path may hold the characters: stored, and shown as text
        await page.fill("#domain", "xss.dash.test")
        await page.click("button:has-text('Create tunnel')")
        await page.wait_for_url(re.compile(r".*notice=created$"), timeout=WAIT)
        assert "<script>window.__xss=1</script>" in await page.inner_text("main")
        await inert("tunnel page", "22-xss-stored-target")
        # its access policy, edited on the page (the payload in a rule is refused)
        tunnel_url = page.url.split("?")[0]
        await page.goto(tunnel_url + "/access")
        await page.fill("#ip_allow", XSS)
        async with page.expect_navigation(timeout=WAIT):
            await page.click("button:has-text('Save the policy')")
        await inert("access form", "26-access-refused")
        await page.fill("#ip_allow", "127.0.0.1")
        await page.fill("#password", PASSWORD)
        await page.fill("#basic_auth", "carol:" + PASSWORD)
        async with page.expect_navigation(timeout=WAIT):
            await page.click("button:has-text('Save the policy')")
        text = await page.inner_text("main")
        assert "only 127.0.0.1/32" in text and "basic auth (carol)" in text
        async with page.expect_navigation(timeout=WAIT):
            await page.click("button:has-text('New share link')")
        assert "/.kakuremichi/share#t=" in await page.inner_text("#share-url")
        await shot(page, "27-share-link")
        await page.goto(tunnel_url)
        await shot(page, "28-tunnel-with-access")
        for path in ("/", "/tunnels", "/audit"):
            await page.goto(control.url + path)
            await inert(path, "23-xss-" + (path.strip("/") or "overview"))

        # a form without its CSRF token is refused, and nothing happens
        await page.goto(control.url + "/agents")
        await page.fill("#name", "no-token")
        await page.evaluate(
            "document.querySelector(\"form[action='/agents'] input[name=csrf]\").remove()"
        )
        async with page.expect_navigation(timeout=WAIT):
            await page.click("form[action='/agents'] button[type=submit]")
        assert "Refused" in await page.inner_text("h1")
        await shot(page, "24-csrf-refused")
        await page.goto(control.url + "/agents")
        assert "no-token" not in await page.inner_text("main")

        # a second browser without the session cookie sees only the sign-in page
        stranger = await setup.browser.new_context(bypass_csp=True)
        other = await stranger.new_page()
        for path in ("/", "/agents", "/tunnels", "/audit", "/users"):
            await other.goto(control.url + path)
            assert other.url == control.url + "/login", path
            assert await other.inner_text("h1") == "Sign in"
        await shot(other, "25-stranger-sign-in")
        await stranger.close()
        assert alerts == []
    finally:
        await context.close()


async def test_artifacts_folder_is_ignored_by_git() -> None:
    root = ARTIFACTS.parents[1]
    assert "/test-artifacts/" in (root / ".gitignore").read_text().splitlines()
