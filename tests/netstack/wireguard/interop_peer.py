"""Our WireGuard peer as a process, for interop tests run inside a network namespace.

Usage: ``python -m tests.netstack.wireguard.interop_peer '<json config>'``.  It serves a
:class:`WireGuardSocket`, answers ICMP echo requests and UDP port 7 (echo) on its tunnel
address, takes JSON commands on stdin (``ping``, ``udp``, ``rebind``, ``quit``) and reports JSON
lines on stdout (events, ICMP replies, UDP datagrams).  It exits on ``quit``, on EOF
of stdin, or after ``lifetime`` seconds, whichever comes first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import struct
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

from netstack.wireguard import events as ev
from netstack.wireguard.aio import WireGuardSocket
from netstack.wireguard.engine import WireGuardEngine

from .harness import ipv4_icmp_echo, ipv4_udp

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    """A TUN device (no packet info header); the caller configures its address."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def main(cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    device = WireGuardEngine(
        base64.b64decode(cfg["private_key"]), random_bytes=os.urandom, wall_clock=time.time
    )
    our_ip, peer_ip = cfg["our_ip"], cfg["peer_ip"]
    if cfg.get("under_load"):
        # Pretend a deep handshake backlog so that we answer with cookie replies and
        # demand mac2, as a loaded wireguard-go would.
        receive = device.receive_datagram

        def loaded(data: bytes, addr: Any, now: float, *, backlog: int = 0) -> None:
            receive(data, addr, now, backlog=1000)

        device.receive_datagram = loaded  # type: ignore[method-assign]
    done = asyncio.Event()

    def on_event(event: ev.Event) -> None:
        fields = {s: getattr(event, s) for s in getattr(event, "__slots__", ()) if s != "peer"}
        emit(
            event=type(event).__name__,
            at=loop.time(),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
        )

    tun_fd = open_tun(cfg["tun"]) if cfg.get("tun") else None

    def on_packet(packet: bytes) -> None:
        if tun_fd is not None:  # the kernel's stack (TCP, ICMP, UDP) answers
            with contextlib.suppress(BlockingIOError):
                os.write(tun_fd, packet)
            return
        if len(packet) < 20 or packet[0] != 0x45:
            return
        proto = packet[9]
        src = ".".join(map(str, packet[12:16]))
        body = packet[20:]
        if proto == 1 and len(body) >= 8:
            kind, _, _, ident, seq = struct.unpack("!BBHHH", body[:8])
            if kind == 8:
                link.udp.send_packet(ipv4_icmp_echo(our_ip, src, ident, seq, body[8:], reply=True))
            elif kind == 0:
                emit(icmp_reply=seq, at=loop.time())
        elif proto == 17 and len(body) >= 8:
            sport, dport = struct.unpack("!HH", body[:4])
            data = body[8:]
            if dport == 7:
                link.udp.send_packet(ipv4_udp(our_ip, src, data, sport=7, dport=sport))
            emit(udp=data.decode(errors="replace"), sport=sport, dport=dport)

    link = SimpleNamespace()
    link.udp = await WireGuardSocket.open(
        device, cfg["listen"][0], cfg["listen"][1], on_packet=on_packet, on_event=on_event
    )
    udp = link.udp
    endpoint = tuple(cfg["endpoint"]) if cfg.get("endpoint") else None
    device.set_peer(
        base64.b64decode(cfg["peer_public"]),
        allowed_ips=[f"{peer_ip}/32", *(f"{ip}/128" for ip in cfg.get("peer_ip6", []))],
        endpoint=endpoint,
        persistent_keepalive=cfg.get("keepalive", 0),
        now=loop.time(),
    )
    udp.flush()

    if tun_fd is not None:
        fd = tun_fd

        def on_tun_readable() -> None:
            for _ in range(512):
                try:
                    packet = os.read(fd, 65535)
                except BlockingIOError:
                    break
                device.send_packet(packet, loop.time())
            link.udp.flush()

        loop.add_reader(fd, on_tun_readable)

    tasks: set[asyncio.Future[None]] = set()

    def command(line: str) -> None:
        if not line.strip():
            return
        cmd = json.loads(line)
        if cmd["cmd"] == "ping":
            link.udp.send_packet(
                ipv4_icmp_echo(our_ip, peer_ip, 0x4242, cmd["seq"], b"kakuremichi" * 4)
            )
        elif cmd["cmd"] == "udp":
            link.udp.send_packet(
                ipv4_udp(our_ip, peer_ip, cmd["data"].encode(), sport=40000, dport=cmd["port"])
            )
        elif cmd["cmd"] == "rebind":  # roam: same WireGuardEngine, new UDP port
            tasks.add(asyncio.ensure_future(rebind(cmd["port"])))
        elif cmd["cmd"] == "quit":
            done.set()

    async def rebind(port: int) -> None:
        link.udp.close()
        link.udp = await WireGuardSocket.open(
            device, cfg["listen"][0], port, on_packet=on_packet, on_event=on_event
        )
        emit(rebound=port)

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(command, line)
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=read_stdin, daemon=True).start()
    emit(ready=True, listen=list(udp.local_address))
    del udp
    try:
        await asyncio.wait_for(done.wait(), cfg.get("lifetime", 60))
    except TimeoutError:
        pass
    finally:
        link.udp.close()
        if tun_fd is not None:
            loop.remove_reader(tun_fd)
            os.close(tun_fd)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
