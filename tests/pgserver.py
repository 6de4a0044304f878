"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package, started as
an unprivileged cluster in a temporary directory on a loopback port.

``initdb`` and ``postgres`` come from ``/usr/lib/postgresql/<version>/bin`` (newest
version installed).  PostgreSQL refuses to run as root, so when the tests run as root
the cluster's directory belongs to ``nobody`` and the server runs as that user.  The
cluster trusts loopback connections (it listens on 127.0.0.1 only and lives as long as
the test session); durability is switched off, since nothing outlives the tests.

``postgres`` (session-scoped) starts one server; :meth:`PostgresServer.database` makes
a fresh, empty database per caller and returns its SQLAlchemy async URL.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support import free_port, need

SUPERUSER = "kakuremichi"
_counter = itertools.count(1)


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` with initdb and postgres, if any."""
    found = []
    for path in glob.glob("/usr/lib/postgresql/*/bin"):
        version = Path(path).parent.name
        if version.isdigit() and os.access(Path(path) / "initdb", os.X_OK):
            found.append((int(version), Path(path)))
    return max(found)[1] if found else None


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, listening on loopback."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="kakuremichi-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.user: str | None = "nobody" if os.geteuid() == 0 else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run_as(self) -> dict[str, object]:
        if self.user is None:
            return {}
        entry = pwd.getpwnam(self.user)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def start(self) -> PostgresServer:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": str(self.root)}
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=self.root,
            **self._run_as(),  # type: ignore[arg-type]
        )
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.root),  # the Unix socket stays in our directory
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=32MB",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            cwd=self.root,
            **self._run_as(),  # type: ignore[arg-type]
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            if self._ready():
                return self
            time.sleep(0.05)
        raise TimeoutError("postgres did not start")

    def _ready(self) -> bool:
        result = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
            check=False,
        )
        return result.returncode == 0

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def database(self) -> str:
        """A new empty database; its SQLAlchemy async URL."""
        name = f"t{os.getpid()}_{next(_counter)}"
        _run_sync(self._admin(f'CREATE DATABASE "{name}"'))
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: PostgreSQL's "smart" shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _run_sync(coro: object) -> None:
    """Run a coroutine from sync code, also when a loop is running in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coro)  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def need_postgres() -> Path:
    bindir = postgres_bin()
    need(bindir is not None, "needs Debian's postgresql package (/usr/lib/postgresql/*/bin)")
    assert bindir is not None
    return bindir


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (each test takes its own database)."""
    server = PostgresServer(need_postgres()).start()
    try:
        yield server
    finally:
        server.stop()
