"""In-memory harness: seeded devices on a virtual clock joined by a fake UDP network."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

from netstack.wireguard.crypto import private_key_from_bytes, public_key_of
from netstack.wireguard.engine import WireGuardEngine

WALL_EPOCH = 1_700_000_000.0
Address = tuple[Any, ...]
Datagram = tuple[bytes, Address, Address]  # payload, source, destination


class Clock:
    """A virtual monotonic clock."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def wall(self) -> float:
        return WALL_EPOCH + self.now


def keypair(seed: int) -> tuple[bytes, bytes]:
    private = random.Random(seed).randbytes(32)
    return private, public_key_of(private_key_from_bytes(private))


def make_engine(seed: int, clock: Clock, **kwargs: Any) -> WireGuardEngine:
    private, _ = keypair(seed)
    rng = random.Random(seed * 7919 + 1)
    return WireGuardEngine(private, random_bytes=rng.randbytes, wall_clock=clock.wall, **kwargs)


class Net:
    """Routes datagrams between devices by address; optional filter drops or captures."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.nodes: dict[Address, WireGuardEngine] = {}
        self.log: list[Datagram] = []
        self.drop: Callable[[Datagram], bool] = lambda d: False
        self.received: dict[Address, list[bytes]] = {}

    def attach(self, addr: Address, device: WireGuardEngine) -> None:
        self.nodes[addr] = device
        self.received[addr] = []

    def address_of(self, device: WireGuardEngine) -> Address:
        return next(a for a, d in self.nodes.items() if d is device)

    def collect(self) -> list[Datagram]:
        out: list[Datagram] = []
        for addr, device in self.nodes.items():
            self.received[addr].extend(device.packets_received())
            out.extend((data, addr, dst) for data, dst in device.datagrams_to_send())
        return out

    def deliver(
        self, datagram: Datagram, *, source: Address | None = None, backlog: int = 0
    ) -> None:
        data, src, dst = datagram
        device = self.nodes.get(dst)
        if device is not None:
            device.receive_datagram(data, source or src, self.clock.now, backlog=backlog)

    def pump(self, rounds: int = 20) -> int:
        """Deliver until quiet; returns the number of datagrams delivered."""
        delivered = 0
        for _ in range(rounds):
            batch = self.collect()
            if not batch:
                break
            for datagram in batch:
                self.log.append(datagram)
                if not self.drop(datagram):
                    self.deliver(datagram)
                    delivered += 1
        self.collect()
        return delivered

    def advance(self, until: float, step_cap: int = 100_000) -> None:
        """Run timers (and pump) up to virtual time ``until``."""
        for _ in range(step_cap):
            deadlines = [
                d for d in (n.next_deadline() for n in self.nodes.values()) if d is not None
            ]
            nxt = min(deadlines, default=None)
            if nxt is None or nxt > until:
                break
            self.clock.now = max(self.clock.now, nxt)
            for node in self.nodes.values():
                node.handle_timer(self.clock.now)
            self.pump()
        else:  # pragma: no cover
            raise AssertionError("timer loop did not settle")
        self.clock.now = max(self.clock.now, until)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(src: str, dst: str, payload: bytes, sport: int = 1234, dport: int = 5678) -> bytes:
    """A complete IPv4/UDP packet with valid checksums."""
    import ipaddress

    s = ipaddress.IPv4Address(src).packed
    d = ipaddress.IPv4Address(dst).packed
    udp_len = 8 + len(payload)
    pseudo = s + d + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0, s, d)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def ipv6_udp(src: str, dst: str, payload: bytes, sport: int = 1234, dport: int = 5678) -> bytes:
    import ipaddress

    s = ipaddress.IPv6Address(src).packed
    d = ipaddress.IPv6Address(dst).packed
    udp_len = 8 + len(payload)
    pseudo = s + d + struct.pack("!IxxxB", udp_len, 17)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return struct.pack("!IHBB16s16s", 6 << 28, udp_len, 17, 64, s, d) + udp


def ipv4_icmp_echo(
    src: str, dst: str, ident: int, seq: int, payload: bytes, reply: bool = False
) -> bytes:
    import ipaddress

    s = ipaddress.IPv4Address(src).packed
    d = ipaddress.IPv4Address(dst).packed
    icmp = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0, s, d)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + icmp


A_ADDR: Address = ("192.0.2.1", 51820)
B_ADDR: Address = ("192.0.2.2", 51820)
A_IP = "10.9.0.1"
B_IP = "10.9.0.2"


def pair(
    clock: Clock, *, psk: bytes | None = None, endpoint_on_b: bool = True
) -> tuple[Net, WireGuardEngine, WireGuardEngine]:
    """Two devices A and B, each the other's peer, with /32 allowed IPs."""
    net = Net(clock)
    a = make_engine(1, clock)
    b = make_engine(2, clock)
    net.attach(A_ADDR, a)
    net.attach(B_ADDR, b)
    a.set_peer(
        b.public_key, allowed_ips=[f"{B_IP}/32", "fd00::2/128"], endpoint=B_ADDR, preshared_key=psk
    )
    b.set_peer(
        a.public_key,
        allowed_ips=[f"{A_IP}/32", "fd00::1/128"],
        endpoint=A_ADDR if endpoint_on_b else None,
        preshared_key=psk,
    )
    return net, a, b


def fresh_initiation(a: WireGuardEngine, b: WireGuardEngine, clock: Clock) -> bytes:
    """A new initiation from ``a`` to its peer ``b``, one second on (past the 20 ms
    initiation rate limit and out of any load state): what a responder bench answers."""
    peer = a.peer(b.public_key)
    assert peer is not None
    clock.now += 1.0
    peer.last_sent_handshake = float("-inf")
    a.initiate_handshake(b.public_key, clock.now)
    ((data, _),) = a.datagrams_to_send()
    return data
