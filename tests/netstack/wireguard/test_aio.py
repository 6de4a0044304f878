"""The asyncio adapter on real loopback UDP sockets (two devices in one loop)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from netstack.wireguard import events as ev
from netstack.wireguard.aio import WireGuardSocket
from netstack.wireguard.engine import WireGuardEngine

from .harness import A_IP, B_IP, ipv4_udp, keypair


def _device(seed: int) -> WireGuardEngine:
    private, _ = keypair(seed)
    return WireGuardEngine(private, random_bytes=os.urandom, wall_clock=time.time)


async def test_loopback_handshake_and_burst() -> None:
    a_events: list[ev.Event] = []
    a = await WireGuardSocket.open(_device(1), "127.0.0.1", 0, on_event=a_events.append)
    b = await WireGuardSocket.open(_device(2), "127.0.0.1", 0)
    try:
        a.engine.set_peer(b.engine.public_key, allowed_ips=[f"{B_IP}/32"], endpoint=b.local_address)
        b.engine.set_peer(a.engine.public_key, allowed_ips=[f"{A_IP}/32"])
        packets = [ipv4_udp(A_IP, B_IP, i.to_bytes(4, "big") * 300) for i in range(2000)]
        assert a.send_packet(packets[0])
        first = await asyncio.wait_for(b.packets.get(), 5)
        assert first == packets[0]
        assert any(isinstance(e, ev.HandshakeCompleted) for e in a_events)
        for start in range(1, len(packets), 100):  # paced bursts: socket buffers may be small
            for packet in packets[start : start + 100]:
                a.send_packet(packet)
            await asyncio.sleep(0.002)
        got = []
        while len(got) < len(packets) - 1:
            try:
                got.append(await asyncio.wait_for(b.packets.get(), 2))
            except TimeoutError:
                break
        assert len(got) >= 0.95 * (len(packets) - 1)  # loopback UDP may still drop a few
        assert got == sorted(got, key=packets.index)
        # and the other way, with the responder's key confirmed
        b.send_packet(ipv4_udp(B_IP, A_IP, b"back"))
        assert await asyncio.wait_for(a.packets.get(), 5) == ipv4_udp(B_IP, A_IP, b"back")
    finally:
        a.close()
        b.close()


async def test_drained_backlog_puts_device_under_load() -> None:
    """300 initiations queued in the socket before one wake-up: the adapter reports
    the backlog, so the device answers the early ones with cookie replies."""
    import hashlib
    import socket

    b = await WireGuardSocket.open(_device(2), "127.0.0.1", 0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.bind(("127.0.0.1", 0))
        sender.settimeout(2)
        key = hashlib.blake2s(b"mac1----" + b.engine.public_key).digest()
        body = b"\x01\x00\x00\x00" + bytes(range(112))
        message = body + hashlib.blake2s(body, digest_size=16, key=key).digest() + bytes(16)
        for _ in range(300):  # no await in between: all land before the reader runs
            sender.sendto(message, b.local_address)
        await asyncio.sleep(0.2)
        replies = []
        sender.setblocking(False)
        for _ in range(1000):
            try:
                replies.append(sender.recv(2048))
            except BlockingIOError:
                break
        assert replies and all(len(r) == 64 and r[0] == 3 for r in replies)
        assert len(replies) >= 300 - 127 - 1
    finally:
        sender.close()
        b.close()


async def test_batch_delivers_tunnel_packets_before_answering_handshakes() -> None:
    """A tunnel packet queued between 400 flood initiations is handed over before the
    first cookie reply leaves (wireguard-go's separate handshake queue)."""
    import hashlib
    import socket

    a = await WireGuardSocket.open(_device(1), "127.0.0.1", 0)
    replies_when_delivered: list[int] = []
    flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flooder.bind(("127.0.0.1", 0))
    flooder.setblocking(False)

    def on_packet(packet: bytes) -> None:
        # loopback sendto queues at once: any cookie reply sent so far is readable now
        waiting = 0
        with contextlib.suppress(BlockingIOError):
            while flooder.recv(2048):
                waiting += 1
        replies_when_delivered.append(waiting)

    b = await WireGuardSocket.open(_device(2), "127.0.0.1", 0, on_packet=on_packet)
    try:
        a.engine.set_peer(b.engine.public_key, allowed_ips=[f"{B_IP}/32"], endpoint=b.local_address)
        b.engine.set_peer(a.engine.public_key, allowed_ips=[f"{A_IP}/32"])
        a.send_packet(ipv4_udp(A_IP, B_IP, b"handshake"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if replies_when_delivered:
                break
        assert replies_when_delivered == [0]
        key = hashlib.blake2s(b"mac1----" + b.engine.public_key).digest()
        body = b"\x01\x00\x00\x00" + bytes(range(112))
        message = body + hashlib.blake2s(body, digest_size=16, key=key).digest() + bytes(16)
        for _ in range(200):  # no await in between: all land before b's reader runs
            flooder.sendto(message, b.local_address)
        a.send_packet(ipv4_udp(A_IP, B_IP, b"during the flood"))
        for _ in range(200):
            flooder.sendto(message, b.local_address)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(replies_when_delivered) == 2:
                break
        assert replies_when_delivered == [0, 0]
        await asyncio.sleep(0.1)
        assert len(flooder.recv(2048)) == 64  # and the flood was answered after it
    finally:
        flooder.close()
        a.close()
        b.close()


async def test_resolve_endpoints_then_apply() -> None:
    import base64

    import pytest

    from netstack.wireguard.aio import resolve_endpoints
    from netstack.wireguard.config import apply_peers, parse_config
    from netstack.wireguard.errors import ConfigError

    priv = base64.b64encode(keypair(1)[0]).decode()
    pub = base64.b64encode(keypair(2)[1]).decode()
    config = parse_config(
        f"[Interface]\nPrivateKey = {priv}\n[Peer]\nPublicKey = {pub}\nEndpoint = localhost:51820\n"
    )
    device = _device(1)
    with pytest.raises(ConfigError, match="host name"):
        apply_peers(config, device)
    resolved = await resolve_endpoints(config)
    assert resolved == {("localhost", 51820): ("127.0.0.1", 51820)}
    apply_peers(config, device, resolved=resolved)
    peer = device.peer(keypair(2)[1])
    assert peer is not None and peer.endpoint == ("127.0.0.1", 51820)


async def test_batches_leave_with_udp_gso_and_arrive_as_datagrams() -> None:
    """A batch of equal-sized packets goes out in few ``sendmsg`` calls (UDP GSO) yet
    arrives as the same datagrams in order; a kernel refusing GSO turns it off."""
    a = await WireGuardSocket.open(_device(1), "127.0.0.1", 0)
    b = await WireGuardSocket.open(_device(2), "127.0.0.1", 0)
    try:
        a.engine.set_peer(b.engine.public_key, allowed_ips=[f"{B_IP}/32"], endpoint=b.local_address)
        b.engine.set_peer(a.engine.public_key, allowed_ips=[f"{A_IP}/32"])
        assert a.send_packet(ipv4_udp(A_IP, B_IP, b"hello"))
        await asyncio.wait_for(b.packets.get(), 5)  # session up
        sizes = [1200] * 100 + [700, 1200, 1200, 64]  # runs, a short tail, a new run
        packets = [ipv4_udp(A_IP, B_IP, bytes([i % 256]) * n) for i, n in enumerate(sizes)]
        assert a.send_packets(packets) == 0
        got = [await asyncio.wait_for(b.packets.get(), 5) for _ in packets]
        assert got == packets
        assert 0 < a.gso_sends < len(packets) // 10

        class Refusing:
            """A socket whose kernel does not do UDP GSO."""

            def __init__(self, sock: object) -> None:
                self.sock = sock

            def sendmsg(self, *args: object) -> int:
                raise OSError(5, "Input/output error")  # EIO, as without checksum offload

            def __getattr__(self, name: str) -> object:
                return getattr(self.sock, name)

        a.sock = Refusing(a.sock)  # type: ignore[assignment]
        assert a.send_packets(packets[:50]) == 0
        got = [await asyncio.wait_for(b.packets.get(), 5) for _ in range(50)]
        assert got == packets[:50] and a.gso is False
    finally:
        a.close()
        b.close()


async def test_timer_is_not_recreated_when_the_deadline_only_moves_later() -> None:
    """Every data packet moves the device's deadline; the adapter keeps one timer armed
    for the earliest moment asked and re-arms only when asked for an earlier one, and
    a timer that fires early finds nothing due and re-arms for what is due then."""

    class FakeDevice:
        def __init__(self) -> None:
            self.deadline: float | None = None
            self.fired: list[float] = []

        def datagrams_to_send(self) -> list[tuple[bytes, tuple[str, int]]]:
            return []

        def packets_received(self) -> list[bytes]:
            return []

        def events(self) -> list[ev.Event]:
            return []

        def next_deadline(self) -> float | None:
            return self.deadline

        def handle_timer(self, now: float) -> None:
            self.fired.append(now)
            if self.deadline is not None and self.deadline <= now:
                self.deadline = None

    import socket

    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    fake = FakeDevice()
    udp = WireGuardSocket(fake, sock)  # type: ignore[arg-type]
    try:
        now = loop.time()
        fake.deadline = now + 0.05
        udp.flush()
        first = udp._timer.handle
        assert first is not None and udp._timer.when == now + 0.05
        fake.deadline = now + 60  # later: the armed timer stays
        udp.flush()
        assert udp._timer.handle is first and udp._timer.when == now + 0.05
        fake.deadline = now + 0.02  # earlier: replaced
        udp.flush()
        assert udp._timer.handle is not first and udp._timer.when == now + 0.02
        assert first.cancelled()
        fake.deadline = now + 0.2  # the armed 0.02 s timer fires early, re-arms for 0.2
        await asyncio.sleep(0.1)
        assert len(fake.fired) == 1 and fake.deadline == now + 0.2
        assert udp._timer.when == now + 0.2
        await asyncio.sleep(0.2)
        assert len(fake.fired) == 2 and fake.deadline is None
        assert udp._timer.handle is None  # nothing due any more: not re-armed
    finally:
        udp.close()


class _Pipe:
    """A routed endpoint's sink that hands the batches to the other socket's
    ``receive_routed`` (as a stream would, in order), counting them."""

    def __init__(self) -> None:
        self.to: WireGuardSocket | None = None
        self.source: tuple[object, ...] = ()
        self.batches: list[list[bytes]] = []
        self.open = True

    def send_datagrams(self, datagrams: list[bytes]) -> None:
        self.batches.append(datagrams)
        if self.open and self.to is not None:
            self.to.receive_routed(list(datagrams), self.source)


async def test_routed_endpoints_carry_a_peer_and_roam_back() -> None:
    """A's traffic to B's UDP endpoint goes through a sink into B as if from a stream
    address; B roams there and answers through the stream; A's UDP socket sends
    nothing meanwhile; B's answers for a stream whose route is gone are dropped (never
    a UDP send to a non-address); A back on UDP makes B roam back."""
    from netstack.wireguard.aio import StreamAddress

    a = await WireGuardSocket.open(_device(1), "127.0.0.1", 0)
    b = await WireGuardSocket.open(_device(2), "127.0.0.1", 0)
    try:
        a.engine.set_peer(b.engine.public_key, allowed_ips=[f"{B_IP}/32"], endpoint=b.local_address)
        b.engine.set_peer(a.engine.public_key, allowed_ips=[f"{A_IP}/32"])
        stream = StreamAddress("wss", "192.0.2.9:5000")
        up, down = _Pipe(), _Pipe()
        up.to, up.source = b, stream  # A → B: B sees the stream address
        down.to, down.source = a, b.local_address  # B → A: A sees B's UDP address
        a.route(b.local_address, up)
        b.route(stream, down)
        udp_sends = a.gso_sends

        assert a.send_packet(ipv4_udp(A_IP, B_IP, b"over the stream"))
        assert await asyncio.wait_for(b.packets.get(), 5) == ipv4_udp(
            A_IP, B_IP, b"over the stream"
        )
        a_on_b = b.engine.peer(a.engine.public_key)
        assert a_on_b is not None and a_on_b.endpoint == stream  # roamed
        b.send_packet(ipv4_udp(B_IP, A_IP, b"answer"))
        assert await asyncio.wait_for(a.packets.get(), 5) == ipv4_udp(B_IP, A_IP, b"answer")
        assert up.batches and down.batches and a.gso_sends == udp_sends
        assert a.routed(b.local_address) is up

        # the stream is gone: B's datagrams for it are dropped, not sent to "wss"
        b.route(stream, None)
        b.send_packet(ipv4_udp(B_IP, A_IP, b"lost"))
        assert b.unrouted >= 1
        # A back on UDP: its next packet moves B's endpoint back to A's socket
        a.route(b.local_address, None)
        a.send_packet(ipv4_udp(A_IP, B_IP, b"over udp"))
        assert await asyncio.wait_for(b.packets.get(), 5) == ipv4_udp(A_IP, B_IP, b"over udp")
        assert a_on_b.endpoint == a.local_address
        b.send_packet(ipv4_udp(B_IP, A_IP, b"udp answer"))
        assert await asyncio.wait_for(a.packets.get(), 5) == ipv4_udp(B_IP, A_IP, b"udp answer")
    finally:
        a.close()
        b.close()


async def test_watch_reports_udp_arrivals_after_processing() -> None:
    """The agent's UDP probe: a watcher hears of datagrams from an endpoint after the
    engine processed them, with the time it used (a handshake completed at that time)."""
    a = await WireGuardSocket.open(_device(1), "127.0.0.1", 0)
    b = await WireGuardSocket.open(_device(2), "127.0.0.1", 0)
    heard: list[tuple[list[bytes], float, float | None]] = []
    try:
        a.engine.set_peer(b.engine.public_key, allowed_ips=[f"{B_IP}/32"], endpoint=b.local_address)
        b.engine.set_peer(a.engine.public_key, allowed_ips=[f"{A_IP}/32"])
        peer = a.engine.peer(b.engine.public_key)
        assert peer is not None

        def watcher(datagrams: list[bytes], now: float) -> None:
            heard.append((datagrams, now, peer.last_handshake))

        a.watch(b.local_address, watcher)
        a.engine.initiate_handshake(b.engine.public_key, a.now())
        a.flush()
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.01)
        datagrams, now, completed = heard[0]
        assert [d[0] for d in datagrams] == [2] and completed == now  # the response
        a.watch(b.local_address, None)
        a.send_packet(ipv4_udp(A_IP, B_IP, b"x"))
        await asyncio.wait_for(b.packets.get(), 5)
        b.send_packet(ipv4_udp(B_IP, A_IP, b"y"))
        await asyncio.wait_for(a.packets.get(), 5)
        assert len(heard) == 1
    finally:
        a.close()
        b.close()
