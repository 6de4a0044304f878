"""The three container images, built once per test session by ``scripts/build-image.sh``
(buildah, vfs storage, chroot isolation, a debootstrap base image) and shared by
tests/agent/test_image.py and tests/deploy/test_images.py.

The three Dockerfiles share their builder stage, so the Control and gateway images add
only their small runtime stages to the agent's; with vfs even a cached step copies the
whole file system, which is why the build runs once, not per module.  The images and
cached layers stay in buildah's storage (``buildah --storage-driver vfs images``); the
base tarball is cached under ``~/.cache/kakuremichi``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import need_binary, need_root

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build-image.sh"
KINDS = ("agent", "control", "gateway")
VERSION_TAG = "test"
DRIVER = os.environ.get("STORAGE_DRIVER", "vfs")
BUILDAH = ("buildah", "--storage-driver", DRIVER)


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """kind → image name, built (or brought up to date from the layer cache) once."""
    need_root()
    need_binary("buildah")
    if not os.environ.get("BASE_IMAGE"):
        need_binary("debootstrap")
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
