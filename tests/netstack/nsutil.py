"""Network-namespace plumbing for the kernel-interop tests (root only).

``TunNamespace`` creates a namespace with a TUN interface inside it; the kernel end has
10.77.0.1/24 and fd77::1/64, our stack answers for 10.77.0.2 and fd77::2.  The TUN fd
stays in this process.  ``ns_socket`` creates a kernel socket inside the namespace (a
short-lived thread enters it with setns(2)), so kernel peers run in the same event loop.
Everything created is deleted in ``close()``.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading

from netstack.tun import open_tun
from tests.support import unique_name

KERNEL_V4 = "10.77.0.1"
STACK_V4 = "10.77.0.2"
KERNEL_V6 = "fd77::1"
STACK_V6 = "fd77::2"
_CLONE_NEWNET = 0x40000000


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


class TunNamespace:
    def __init__(self, index: int = 0, mtu: int = 1500) -> None:
        self.ns = unique_name("nsk", index)
        self.dev = unique_name("tnk", index)
        self.mtu = mtu
        self.fd = -1
        run("ip", "netns", "add", self.ns)
        try:
            self.fd = open_tun(self.dev)
            run("ip", "link", "set", self.dev, "netns", self.ns)
            self.exec("ip", "link", "set", "lo", "up")
            self.exec("ip", "link", "set", self.dev, "mtu", str(mtu), "up")
            self.exec("ip", "addr", "add", f"{KERNEL_V4}/24", "dev", self.dev)
            self.exec("ip", "-6", "addr", "add", f"{KERNEL_V6}/64", "dev", self.dev, "nodad")
        except BaseException:
            self.close()
            raise

    def exec(self, *args: str) -> None:
        run("ip", "netns", "exec", self.ns, *args)

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def socket(
        self, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        return ns_socket(self.ns, family, type_, proto)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=20)


def ns_socket(ns: str, family: int, type_: int, proto: int = 0) -> socket.socket:
    result: list[socket.socket | BaseException] = []

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{ns}", "rb") as handle:
                if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            result.append(socket.socket(family, type_, proto))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join(10)
    item = result[0]
    if isinstance(item, BaseException):
        raise item
    item.setblocking(False)
    return item
