"""Network namespaces joined by veth, created and removed by the tests themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support import unique_name

ROOT = Path(__file__).resolve().parents[2]


def sh(
    *argv: str,
    check: bool = True,
    netns: str | None = None,
    timeout: float = 60,
    **kwargs: object,
) -> subprocess.CompletedProcess[str]:
    if netns:
        argv = ("ip", "netns", "exec", netns, *argv)
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        argv, check=check, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def _kill_and_delete(namespaces: list[str]) -> None:
    for ns in namespaces:
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], check=False)
        sh("ip", "netns", "del", ns, check=False)


@contextmanager
def lan(tag: str, count: int) -> Iterator[list[str]]:
    """``count`` namespaces on one switched LAN: host i is 192.0.2.(i+1)/24.

    The switch is a bridge in a namespace of its own; everything is removed on exit
    (processes still running in the namespaces are killed)."""
    switch = unique_name(f"{tag}s")
    hosts = [unique_name(f"{tag}h", i) for i in range(count)]
    try:
        sh("ip", "netns", "add", switch)
        sh("ip", "link", "add", "br0", "type", "bridge", netns=switch)
        sh("ip", "link", "set", "br0", "up", netns=switch)
        for i, ns in enumerate(hosts):
            inner, outer = unique_name(f"{tag}v", i), unique_name(f"{tag}p", i)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "netns", switch)
            sh("ip", "link", "set", outer, "master", "br0", netns=switch)
            sh("ip", "link", "set", outer, "up", netns=switch)
            sh("ip", "addr", "add", f"192.0.2.{i + 1}/24", "dev", inner, netns=ns)
            sh("ip", "link", "set", inner, "up", netns=ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
        yield hosts
    finally:
        _kill_and_delete([*hosts, switch])


def spawn(
    netns: str,
    *argv: str,
    log: Path,
    env_extra: dict[str, str] | None = None,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in ``netns`` (as ``user`` if given, via setpriv), output to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    prefix: list[str] = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"]
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            ["ip", "netns", "exec", netns, *prefix, *argv],
            env=env,
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def admin(netns: str, control_url: str, token: str, *args: str) -> dict[str, Any]:
    """``kakuremichi admin … --json`` run inside ``netns``."""
    out = sh(
        sys.executable,
        "-m",
        "kakuremichi.cli",
        "admin",
        *args,
        "--json",
        "--control-url",
        control_url,
        "--admin-token",
        token,
        netns=netns,
    )
    result: dict[str, Any] = json.loads(out.stdout) if out.stdout.strip().startswith("{") else {}
    return result


@contextmanager
def two_hosts(tag: str) -> Iterator[tuple[str, str]]:
    """Namespaces A (192.0.2.1/24) and B (192.0.2.2/24) on one veth pair."""
    a, b = unique_name(f"{tag}a"), unique_name(f"{tag}b")
    va, vb = unique_name(f"{tag}va"), unique_name(f"{tag}vb")
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        sh("ip", "link", "set", va, "netns", a)
        sh("ip", "link", "set", vb, "netns", b)
        for ns, dev, addr in ((a, va, "192.0.2.1/24"), (b, vb, "192.0.2.2/24")):
            sh("ip", "addr", "add", addr, "dev", dev, netns=ns)
            sh("ip", "link", "set", dev, "up", netns=ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
        yield a, b
    finally:
        _kill_and_delete([a, b])
