"""A Linux TUN device as a ``PacketLink`` (tests, benchmarks, privileged deployments).

Theory of operation
-------------------
``open_tun`` creates (or attaches to) a layer-3 TUN interface with ``IFF_TUN |
IFF_NO_PI`` through the ``TUNSETIFF`` ioctl (Documentation/networking/tuntap.rst): each
``read()`` returns one IP packet, each ``write()`` injects one.  No virtio-net header is
requested, so the kernel hands us complete packets with finished checksums and never
GSO super-packets.  ``TunLink`` drains the fd from ``loop.add_reader`` (up to
``batch`` packets per wake-up, since one datagram per iteration is slow, see
DESIGN.md) and writes synchronously; a full device queue drops the packet, as a
congested link would.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
from collections.abc import Callable

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    """Open ``/dev/net/tun`` as interface ``name``; returns a non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class TunLink:
    """A ``PacketLink`` over a TUN fd (the caller owns and closes the fd)."""

    def __init__(self, fd: int, *, mtu: int = 1500, batch: int = 256) -> None:
        self.fd = fd
        self._size = mtu + 64
        self._batch = batch
        self._receive: Callable[[bytes], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped = 0

    def attach(self, receive: Callable[[bytes], None]) -> None:
        """Start reading; every packet goes to ``receive``."""
        self._receive = receive
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._on_readable)

    def detach(self) -> None:
        """Stop reading."""
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None

    def _on_readable(self) -> None:
        receive = self._receive
        if receive is None:
            return
        for _ in range(self._batch):
            try:
                packet = os.read(self.fd, self._size)
            except (BlockingIOError, InterruptedError):
                return
            receive(packet)

    def send(self, packet: bytes) -> None:
        """Inject one packet; dropped if the device queue is full."""
        try:
            os.write(self.fd, packet)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
        except OSError:  # interface down or gone: IP is best effort
            self.dropped += 1
