"""Network namespaces joined by veth, created and removed by the tests themselves."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support import unique_name


def sh(
    *argv: str, check: bool = True, netns: str | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    if netns:
        argv = ("ip", "netns", "exec", netns, *argv)
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload]


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
        for ns in (a, b):
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], check=False)
            sh("ip", "netns", "del", ns, check=False)
