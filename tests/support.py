"""Helpers shared by the test suites.

``need()`` is the only way a test may skip for a missing capability: on a developer
laptop it skips with the reason, but under ``CI=true`` it fails, so CI can never go
green by skipping the interop and system tests.
"""

from __future__ import annotations

import os
import random
import shutil
import socket

import pytest

IN_CI = os.environ.get("CI") == "true"


def need(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but a test requirement is missing: {reason}")
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (network namespaces, TUN)")


def need_binary(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"needs the {name!r} program on PATH")
    assert path is not None
    return path


#: ports handed out by this process (never twice), below the kernel's ephemeral range
_GIVEN: set[int] = set()
_RANGE = (10_000, 32_000)


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free right now (TCP by default; ``kind=socket.SOCK_DGRAM`` for UDP).

    Taken below the kernel's ephemeral range (32768-60999 by default), never twice in
    one process: a port the kernel picks for ``bind(0)`` is one it may soon give to an
    outgoing connection's source, which made a server started a moment later fail with
    "address already in use" on a busy machine."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(*_RANGE)
        if port in _GIVEN:
            continue
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port found below the ephemeral range")


def unique_name(prefix: str, index: int = 0) -> str:
    """A host-wide unique interface/namespace name (<= 15 chars) with our PID in it."""
    name = f"{prefix}{os.getpid() % 100000}{index}"
    assert len(name) <= 15, name
    return name


def metric_sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition (labels in any order,
    values as ``1`` or ``1.0``), or None when it is not there."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        base, _, rest = series.partition("{")
        if base != name:
            continue
        found = set(rest.rstrip("}").split(",")) if rest else set()
        found.discard("")
        if found == wanted:
            return float(value)
    return None
