"""The three container images, built once per test session by ``scripts/build-image.sh``
(buildah, vfs storage, chroot isolation, a debootstrap base image) and shared by
tests/agent/test_image.py and tests/deploy/test_images.py.

The three Dockerfiles share their builder stage, so the Control and gateway images add
only their small runtime stages to the agent's; with vfs even a cached step copies the
whole file system, which is why the build runs once, not per module.  The images and
cached layers stay in buildah's storage (``buildah --storage-driver vfs images``); the
base tarball is cached under ``~/.cache/kakuremichi``.

``scripts/test.sh`` starts that build in the background before anything else and names
its directory in ``KAKUREMICHI_TEST_IMAGE_BUILD`` (``log``, and ``rc`` once it ends);
the fixture then waits for it instead of building, and the tests using it run last
(``tests/conftest.py``), so the build overlaps the rest of the run.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import need_binary, need_root

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build-image.sh"
KINDS = ("agent", "control", "gateway")
VERSION_TAG = "test"
DRIVER = os.environ.get("STORAGE_DRIVER", "vfs")
BUILDAH = ("buildah", "--storage-driver", DRIVER)
#: a build already started (by scripts/test.sh): its directory
BUILD_ENV = "KAKUREMICHI_TEST_IMAGE_BUILD"
BUILD_TIMEOUT = 1700.0


def wait_for_build(directory: Path, timeout: float = BUILD_TIMEOUT) -> None:
    """Wait for the background build in ``directory`` to end; fail with its log unless
    it exited 0."""
    rc = directory / "rc"
    deadline = time.monotonic() + timeout
    while not rc.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the background image build ({directory}) did not end in {timeout:.0f} s")
        time.sleep(1.0)
    log = (directory / "log").read_text(errors="replace") if (directory / "log").exists() else ""
    print(log)  # pytest's capture: shown on failure, or live with -s
    status = rc.read_text().strip()
    if status != "0":
        pytest.fail(f"scripts/build-image.sh exited {status}:\n{log[-4000:]}")


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """kind → image name, built (or brought up to date from the layer cache) once."""
    need_root()
    need_binary("buildah")
    if not os.environ.get("BASE_IMAGE"):
        need_binary("debootstrap")
    started = os.environ.get(BUILD_ENV)
    if started:
        wait_for_build(Path(started))
        return {kind: f"localhost/kakuremichi-{kind}:{VERSION_TAG}" for kind in KINDS}
    # Output goes to pytest's capture: shown on failure, or live with -s.
    subprocess.run(
        [str(SCRIPT), "--version-tag", VERSION_TAG, *KINDS],
        check=True,
        timeout=1700,
        cwd=ROOT,
        env={**os.environ, "STORAGE_DRIVER": DRIVER},
    )
    return {kind: f"localhost/kakuremichi-{kind}:{VERSION_TAG}" for kind in KINDS}


def buildah(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout)


def run_line(container: str, *command: str, env: dict[str, str] | None = None) -> list[str]:
    """The command line running ``command`` in ``container`` as its configured user."""
    flags = [arg for key, value in (env or {}).items() for arg in ("--env", f"{key}={value}")]
    return [*BUILDAH, "run", "--isolation", "chroot", *flags, container, "--", *command]


def run_in(
    container: str, *command: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        run_line(container, *command, env=env), capture_output=True, text=True, timeout=120
    )
