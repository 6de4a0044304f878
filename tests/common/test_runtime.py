"""The control-driven runtime shared by the gateway and the agent (common/runtime.py),
its task supervisor (common/supervisor.py) and health parts (common/health.py).

Back-off waits go through a fake clock and sleep (FakeTime), so the policy's delays
are checked exactly without waiting for them; Control is an unreachable address (the
runtime's view is fed the way the client feeds it: ``view.apply`` then ``on_change``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from common import protocol as p
from common.controlclient import ControlClientSettings, ControlView
from common.health import DEGRADED, DOWN, OK, Health, PartHealth
from common.keys import KeyPair
from common.relay.admin import AdminServer
from common.relay.metrics import Metrics
from common.runtime import STATE_FILE, ControlRuntime
from common.supervisor import Backoff, Supervisor
from tests.configframes import agent_config_data, gateway_config_data
from tests.support import free_port

PEER_KEY = KeyPair.generate().public_b64


class FakeTime:
    """A clock that only moves when someone sleeps (or the test moves it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[float], None] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        if self.on_sleep is not None:
            self.on_sleep(delay)
        self.now += delay
        await asyncio.sleep(0)


async def until(predicate: Callable[[], object], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.005)


def tunnel(tunnel_id: str, domain: str) -> dict[str, Any]:
    return p.TunnelSpec(
        tunnel_id, "http", domain, None, "127.0.0.1:8080", "a", "100.64.0.100", True
    ).to_wire()


def config_data(role: str, *tunnels: dict[str, Any]) -> dict[str, Any]:
    """A ``config`` frame's data for ``role``, as Control sends it."""
    if role == "agent":
        return agent_config_data(*tunnels, gateway_key=PEER_KEY)
    return gateway_config_data(*tunnels, agent_key=PEER_KEY)


class Program:
    """What a gateway or agent gives the runtime: an apply that records what it got
    and fails while ``failures`` holds exceptions (None: that pass succeeds)."""

    def __init__(self, role: str, data_dir: Path, time: FakeTime, **options: Any) -> None:
        self.applied: list[Any] = []
        self.failures: list[BaseException | None] = []
        self.stored_before_apply: list[bool] = []
        #: awaited at the start of every apply (a test holds a pass inside it)
        self.before_apply: Callable[[], Awaitable[None]] | None = None
        select = ControlView.agent_config if role == "agent" else ControlView.gateway_config
        self.runtime: ControlRuntime[Any] = ControlRuntime(
            ControlClientSettings(
                control_url=f"http://127.0.0.1:{free_port()}",  # nobody listens
                api_key="agt_test_key_not_logged_0123456789" if role == "agent" else "gtw_x" * 8,
                client_type=role,
                public_key=KeyPair.generate().public_b64,
                version="test",
                public_ip="192.0.2.1" if role == "gateway" else None,
                wireguard_port=51820 if role == "gateway" else None,
            ),
            data_dir,
            select,
            self.apply,
            clock=time.clock,
            sleep=time.sleep,
            **options,
        )

    async def apply(self, config: Any) -> None:
        if self.before_apply is not None:
            await self.before_apply()
        self.stored_before_apply.append(self.runtime.state_path.exists())
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure
        self.applied.append(config)

    def deliver(self, type_: str, data: dict[str, Any], version: int) -> None:
        """As the Control client does with a frame from Control."""
        view = self.runtime.view
        if view.apply(p.Frame(type_, data, version), self.runtime.role):
            assert self.runtime.client.on_change is not None
            self.runtime.client.on_change(view)


def stored_domains(path: Path) -> list[str]:
    return [t["domain"] for t in json.loads(path.read_text())["tunnels"]]


# -- back-off and health parts --------------------------------------------------------


def test_backoff_doubles_from_one_second_to_a_minute() -> None:
    assert [Backoff().delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert Backoff(0.5, 3).delay(10**6) == 3


def test_health_report_worst_part_wins_and_probes_are_contained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = Health()
    assert health.report().state == OK and health.report().http_status == 200
    health.set("control", OK, "connected")
    health.probe("wireguard", lambda: PartHealth(DEGRADED, "1 of 2 gateways"))
    report = health.report()
    assert (report.state, report.http_status) == (DEGRADED, 200)
    assert list(report.problems()) == ["wireguard"]
    body = json.loads(report.to_json())
    assert body == {
        "status": "degraded",
        "parts": {
            "control": {"state": "ok", "reason": "connected"},
            "wireguard": {"state": "degraded", "reason": "1 of 2 gateways"},
        },
    }
    # a probe that raises is a bug: the part reads as down, logged with its traceback
    health.probe("wireguard", lambda: PartHealth(OK, str(1 / 0)))
    for _ in range(3):
        report = health.report()
    assert report.parts["wireguard"] == PartHealth(DOWN, "health probe raised ZeroDivisionError")
    assert report.http_status == 503
    failed = [r for r in caplog.records if r.getMessage() == "health probe failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None  # once a minute
    # reasons are bounded and never carry a key
    health.set("control", DEGRADED, "refused agt_abcdefghijklmnop " + "x" * 1000)
    reason = health.report().parts["control"].reason
    assert "agt_abcdefghijklmnop" not in reason and len(reason) <= 300
    with pytest.raises(ValueError):
        PartHealth("sick")


# -- the supervisor -------------------------------------------------------------------


async def test_a_task_that_dies_is_logged_and_restarted_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    time = FakeTime()
    health = Health()
    supervisor = Supervisor("agent", health, clock=time.clock, sleep=time.sleep)
    runs = 0
    forever = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ValueError("boom")
        if runs == 2:
            return  # ended without an error: just as wrong for a task meant to run on
        if runs == 3:
            raise asyncio.CancelledError  # a cancellation leaking from inside
        if runs == 4:
            time.now += 31  # a run long enough to count as stable ...
            raise OSError("late")  # ... so the back-off starts over
        await forever.wait()

    caplog.set_level(logging.INFO)
    supervisor.start("target-health", flaky)
    await until(lambda: runs == 5)
    assert time.sleeps == [1, 2, 4, 1]
    assert supervisor.restarts("target-health") == 4 and supervisor.running("target-health")
    died = [r for r in caplog.records if "ended unexpectedly" in r.getMessage()]
    assert [r.fields["error"] for r in died] == [  # type: ignore[attr-defined]
        "ValueError: boom",
        "returned",
        "cancelled from inside",
        "OSError: late",
    ]
    assert all(r.levelno == logging.ERROR for r in died)
    assert all(r.fields["task"] == "target-health" for r in died)  # type: ignore[attr-defined]
    assert all(r.fields["role"] == "agent" for r in died)  # type: ignore[attr-defined]
    assert [r.exc_info is not None for r in died] == [True, False, True, True]
    # the part names the task until the new run has lasted stable_after
    tasks = health.part("tasks")
    assert tasks is not None and tasks.state == DEGRADED
    assert "target-health restarted" in tasks.reason and "OSError: late" in tasks.reason
    time.now += 30
    assert health.part("tasks") == PartHealth(OK, "1 running")
    await supervisor.stop()


async def test_stop_cancels_and_awaits_every_task_without_error_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor("gateway", stop_timeout=0.2)
    cleaned: list[str] = []
    started = asyncio.Event()

    async def worker(name: str) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup may await
            cleaned.append(name)

    supervisor.start("stats", lambda: worker("stats"))
    supervisor.start("acme", lambda: worker("acme"))
    with pytest.raises(ValueError):
        supervisor.start("acme", lambda: worker("again"))
    await started.wait()
    await asyncio.sleep(0)
    await supervisor.stop()
    assert sorted(cleaned) == ["acme", "stats"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(RuntimeError):
        supervisor.start("late", lambda: worker("late"))
    await Supervisor("nothing").stop()  # nothing started: nothing to wait for


async def test_stop_names_a_task_that_ignores_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor("agent", stop_timeout=0.05)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def stubborn() -> None:
        try:
            entered.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # swallows the cancellation

    supervisor.start("stubborn", stubborn)
    await entered.wait()
    await supervisor.stop()
    stuck = [r for r in caplog.records if "did not stop" in r.getMessage()]
    assert len(stuck) == 1 and stuck[0].fields["tasks"] == "stubborn"  # type: ignore[attr-defined]
    release.set()
    await asyncio.sleep(0.01)  # it returns now, during stop: not a fault
    assert not [r for r in caplog.records if "ended unexpectedly" in r.getMessage()]


# -- the runtime --------------------------------------------------------------------


async def test_apply_errors_are_logged_retried_with_backoff_and_the_previous_config_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    time = FakeTime()
    program = Program("agent", tmp_path, time)
    runtime = program.runtime
    caplog.set_level(logging.INFO)
    runtime.start()
    try:
        program.deliver("config", config_data("agent", tunnel("t1", "one.example.com")), 3)
        await until(lambda: runtime.applied == 1)
        assert stored_domains(runtime.state_path) == ["one.example.com"]
        assert oct(runtime.state_path.stat().st_mode & 0o777) == "0o600"
        assert runtime.health.part("config") == PartHealth(
            OK, "applied control's version 3 (1 tunnels)"
        )

        # the next configuration fails: a bug twice (traceback), then an OSError (one line)
        program.failures = [RuntimeError("bug"), KeyError("k"), OSError(5, "I/O error")]
        seen_while_failing: list[PartHealth | None] = []
        time.on_sleep = lambda _: seen_while_failing.append(runtime.health.part("config"))
        program.deliver("tunnel_create", tunnel("t2", "two.example.com"), 4)
        await until(lambda: runtime.applied == 2)
        assert time.sleeps == [1, 2, 4]
        failed = [
            r for r in caplog.records if "applying the configuration failed" in r.getMessage()
        ]
        assert [r.fields["error"] for r in failed] == [  # type: ignore[attr-defined]
            "RuntimeError: bug",
            "KeyError: 'k'",
            "OSError: [Errno 5] I/O error",
        ]
        assert [r.exc_info is not None for r in failed] == [True, True, False]
        for record in failed:
            fields = record.fields  # type: ignore[attr-defined]
            assert fields["role"] == "agent" and fields["source"] == "control"
            assert (fields["config_version"], fields["tunnels"]) == (4, 2)
            assert fields["previous_in_force"] is True
        assert [f["retry_in_s"] for f in (r.fields for r in failed)] == [1, 2, 4]  # type: ignore[attr-defined]
        # while failing: degraded with the reason, the previous configuration in force
        first = seen_while_failing[0]
        assert first is not None and first.state == DEGRADED
        assert "RuntimeError: bug" in first.reason and "previous one stays" in first.reason
        assert program.stored_before_apply == [False, True, True, True, True]
        # the stored file kept the last good configuration until the success
        assert stored_domains(runtime.state_path) == ["one.example.com", "two.example.com"]
        assert [t.id for t in program.applied[-1].tunnels] == ["t1", "t2"]
        assert runtime.health.part("config") == PartHealth(
            OK, "applied control's version 4 (2 tunnels)"
        )
        assert "agt_test_key" not in caplog.text
    finally:
        await runtime.stop()


async def test_a_failing_apply_keeps_the_stored_file_of_the_last_success(tmp_path: Path) -> None:
    time = FakeTime()
    program = Program("gateway", tmp_path, time)
    runtime = program.runtime
    runtime.start()
    try:
        program.deliver("config", config_data("gateway", tunnel("t1", "one.example.com")), 1)
        await until(lambda: runtime.applied == 1)
        during_retry: list[tuple[list[str], list[str], PartHealth | None]] = []
        time.on_sleep = lambda _: during_retry.append(
            (
                stored_domains(runtime.state_path),
                [t.id for t in runtime.applied_config.tunnels],  # type: ignore[union-attr]
                runtime.health.part("config"),
            )
        )
        program.failures = [OSError("wg set failed")]
        program.deliver("tunnel_create", tunnel("t2", "two.example.com"), 2)
        await until(lambda: runtime.applied == 2)
        [(stored, applied, config)] = during_retry
        assert (stored, applied) == (["one.example.com"], ["t1"])
        assert config is not None and config.state == DEGRADED
        assert "OSError: wg set failed" in config.reason
        assert stored_domains(runtime.state_path) == ["one.example.com", "two.example.com"]
    finally:
        await runtime.stop()


async def test_a_change_arriving_during_apply_is_not_stored_before_it_is_applied(
    tmp_path: Path,
) -> None:
    """The file holds what a pass applied, not the view as it stood when the pass
    ended: a frame landing during an ``await`` in apply waits for the next pass."""
    time = FakeTime()
    program = Program("gateway", tmp_path, time)
    runtime = program.runtime
    inside = asyncio.Event()
    release = asyncio.Event()

    async def hold_the_first_pass() -> None:
        program.before_apply = None
        inside.set()
        await release.wait()

    program.before_apply = hold_the_first_pass
    stored_at_retry: list[list[str]] = []
    time.on_sleep = lambda _: stored_at_retry.append(stored_domains(runtime.state_path))
    runtime.start()
    try:
        program.deliver("config", config_data("gateway", tunnel("t1", "one.example.com")), 1)
        await inside.wait()
        program.deliver("tunnel_create", tunnel("t2", "two.example.com"), 2)
        program.failures = [None, OSError("the second pass fails")]
        release.set()
        await until(lambda: runtime.applied == 2)
        assert stored_at_retry == [["one.example.com"]]
        assert stored_domains(runtime.state_path) == ["one.example.com", "two.example.com"]
    finally:
        await runtime.stop()


@pytest.mark.parametrize("role", ["agent", "gateway"])
async def test_the_stored_config_is_0600_and_served_at_the_next_start(
    role: str, tmp_path: Path
) -> None:
    time = FakeTime()
    first = Program(role, tmp_path, time)
    (tmp_path / STATE_FILE).write_text("{}")
    (tmp_path / STATE_FILE).chmod(0o644)  # an older file with other bits
    first.runtime.start()
    try:
        first.deliver("config", config_data(role, tunnel("t1", "app.example.com")), 9)
        await until(lambda: first.runtime.applied == 1)
    finally:
        await first.runtime.stop()
    path = tmp_path / STATE_FILE
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert stored_domains(path) == ["app.example.com"]

    # restarted while Control is away: the stored configuration is applied at once
    again = Program(role, tmp_path, time)
    runtime = again.runtime
    assert runtime.health.report().http_status == 503  # nothing to serve yet
    runtime.start()
    try:
        await until(lambda: runtime.applied == 1)
        config = again.applied[0]
        assert isinstance(config, p.AgentConfig if role == "agent" else p.GatewayConfig)
        assert [t.domain for t in config.tunnels] == ["app.example.com"]
        assert runtime.source == "stored"
        report = runtime.health.report()
        assert report.http_status == 200 and report.state == DEGRADED
        assert report.parts["config"] == PartHealth(
            OK, "applied the stored configuration (1 tunnels)"
        )
        assert report.parts["control"].state == DEGRADED
        assert "serving the stored configuration" in report.parts["control"].reason
    finally:
        await runtime.stop()


async def test_healthz_names_the_parts_and_turns_503_and_200(tmp_path: Path) -> None:
    time = FakeTime()
    program = Program("agent", tmp_path, time)
    runtime = program.runtime
    wireguard = {"part": PartHealth(OK, "1 of 1 gateways have a live session")}
    runtime.health.probe("wireguard", lambda: wireguard["part"])
    admin = AdminServer(Metrics(), runtime.health)
    await admin.start("127.0.0.1", 0)
    runtime.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin.port}") as http:

            async def healthz() -> tuple[int, dict[str, Any]]:
                response = await http.get("/healthz")
                assert response.headers["content-type"] == "application/json"
                return response.status_code, response.json()

            status, body = await healthz()
            assert status == 503 and body["status"] == "down"
            assert body["parts"]["config"] == {
                "state": "down",
                "reason": "no configuration from control yet",
            }
            assert body["parts"]["control"]["state"] == "down"
            assert set(body["parts"]) == {"control", "config", "tasks", "wireguard"}

            program.deliver("config", config_data("agent"), 2)
            await until(lambda: runtime.applied == 1)
            status, body = await healthz()
            assert (status, body["status"]) == (200, "degraded")  # Control still away
            assert body["parts"]["config"]["state"] == "ok"
            assert body["parts"]["control"]["state"] == "degraded"
            assert (
                "serving the last configuration from control"
                in (body["parts"]["control"]["reason"])
            )

            wireguard["part"] = PartHealth(DOWN, "no gateway has completed a WireGuard handshake")
            status, body = await healthz()
            assert (status, body["status"]) == (503, "down")
            assert body["parts"]["wireguard"] == {
                "state": "down",
                "reason": "no gateway has completed a WireGuard handshake",
            }
            wireguard["part"] = PartHealth(OK, "back")
            status, _ = await healthz()
            assert status == 200
            head = await http.head("/healthz")
            assert head.status_code == 200 and head.content == b""
    finally:
        await runtime.stop()
        await admin.close()
