"""Interop with wireguard-go in network namespaces (root only; never skipped in CI).

Topology (created and deleted by each test)::

    ns "go" (wireguard-go, tunnel 10.77.0.1)        ns "py" (our peer process, 10.77.0.2)
    veth 172.30.0.1/24  <-------------------------> veth 172.30.0.2/24 (+ .3 for floods)

Our side runs ``interop_peer.py`` under ``ip netns exec`` and is driven over pipes.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netstack.wireguard.config import (
    Config,
    InterfaceConfig,
    PeerConfig,
    format_config,
    parse_config,
)
from netstack.wireguard.crypto import private_key_from_bytes, public_key_of
from tests.support import need_binary, need_root, unique_name

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[3]
GO_IP, PY_IP = "10.77.0.1", "10.77.0.2"
GO_IP6, PY_IP6 = "fd77::1", "fd77::2"
GO_VETH_IP, PY_VETH_IP, FLOOD_IP = "172.30.0.1", "172.30.0.2", "172.30.0.3"
GO_PORT, PY_PORT = 51820, 51821


def run(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Topology:
    """Two namespaces joined by a veth pair, wireguard-go running in the first."""

    def __init__(self, index: int, tmp: Path) -> None:
        self.go_ns = unique_name("wgtg", index)
        self.py_ns = unique_name("wgtp", index)
        self.veth_go = unique_name("wvg", index)
        self.veth_py = unique_name("wvp", index)
        self.wg = unique_name("wgo", index)
        self.tmp = tmp
        self.go_private = os.urandom(32)
        self.py_private = os.urandom(32)
        self.go_public = public_key_of(private_key_from_bytes(self.go_private))
        self.py_public = public_key_of(private_key_from_bytes(self.py_private))
        self.daemon: subprocess.Popen[bytes] | None = None
        self.children: list[subprocess.Popen[Any]] = []

    def up(self) -> None:
        run("ip", "netns", "add", self.go_ns)
        run("ip", "netns", "add", self.py_ns)
        run(
            "ip", "link", "add", self.veth_go, "netns", self.go_ns,
            "type", "veth", "peer", "name", self.veth_py, "netns", self.py_ns,
        )  # fmt: skip
        for ns, dev, addrs in (
            (self.go_ns, self.veth_go, [GO_VETH_IP]),
            (self.py_ns, self.veth_py, [PY_VETH_IP, FLOOD_IP]),
        ):
            for addr in addrs:
                run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        self.daemon = subprocess.Popen(
            ["ip", "netns", "exec", self.go_ns, "wireguard-go", "-f", self.wg],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "LOG_LEVEL": "error"},
        )
        sock = Path(f"/var/run/wireguard/{self.wg}.sock")
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        else:
            raise AssertionError("wireguard-go did not create its UAPI socket")
        key = self.tmp / "go.key"
        key.write_text(b64(self.go_private))
        key.chmod(0o600)
        run("ip", "netns", "exec", self.go_ns, "wg", "set", self.wg,
            "private-key", str(key), "listen-port", str(GO_PORT))  # fmt: skip
        run("ip", "-n", self.go_ns, "addr", "add", f"{GO_IP}/24", "dev", self.wg)
        run("ip", "-n", self.go_ns, "-6", "addr", "add", f"{GO_IP6}/64", "dev", self.wg, "nodad")
        run("ip", "-n", self.go_ns, "link", "set", self.wg, "up")

    def go_peer(self, *extra: str) -> None:
        run("ip", "netns", "exec", self.go_ns, "wg", "set", self.wg, "peer", b64(self.py_public),
            "allowed-ips", f"{PY_IP}/32,{PY_IP6}/128", *extra)  # fmt: skip

    def go_exec(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.go_ns, *args, check=False, timeout=timeout)

    def wg_show(self, what: str) -> str:
        return run("ip", "netns", "exec", self.go_ns, "wg", "show", self.wg, what).stdout

    def spawn(self, ns: str, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], cwd=REPO, **kw)
        self.children.append(proc)
        return proc

    def down(self) -> None:
        for proc in [*self.children, *([self.daemon] if self.daemon else [])]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        for ns in (self.go_ns, self.py_ns):
            run("ip", "netns", "del", ns, check=False)
        with contextlib.suppress(FileNotFoundError):
            Path(f"/var/run/wireguard/{self.wg}.sock").unlink()


class PyPeer:
    """Our WireGuard peer process (interop_peer.py) and its JSON-lines channel."""

    def __init__(
        self,
        topo: Topology,
        *,
        endpoint: bool,
        lifetime: float = 120,
        tun: str | None = None,
        under_load: bool = False,
    ) -> None:
        cfg = {
            "tun": tun,
            "under_load": under_load,
            "private_key": b64(topo.py_private),
            "peer_public": b64(topo.go_public),
            "listen": [PY_VETH_IP, PY_PORT],
            "endpoint": [GO_VETH_IP, GO_PORT] if endpoint else None,
            "our_ip": PY_IP,
            "peer_ip": GO_IP,
            "peer_ip6": [GO_IP6],
            "lifetime": lifetime,
        }
        self.proc = topo.spawn(
            topo.py_ns, sys.executable, "-m", "tests.netstack.wireguard.interop_peer",
            json.dumps(cfg), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._reader, daemon=True).start()
        self.wait_for(lambda m: m.get("ready"), 15)

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait_for(self, pred: Any, timeout: float) -> dict[str, Any]:
        for message in self.seen:
            if pred(message):
                return message
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(message)
            if pred(message):
                return message
        raise AssertionError(f"timed out; peer said: {self.seen[-20:]}")

    def ping(self, seq: int, timeout: float = 10, retries: int = 1) -> None:
        for attempt in range(retries):
            self.send(cmd="ping", seq=seq)
            try:
                self.wait_for(lambda m: m.get("icmp_reply") == seq, timeout / retries)
                return
            except AssertionError:
                if attempt == retries - 1:
                    raise

    def events(self, name: str) -> list[dict[str, Any]]:
        return [m for m in self.seen if m.get("event") == name]


@pytest.fixture
def topo(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Topology]:
    need_root()
    need_binary("wireguard-go")
    need_binary("wg")
    need_binary("ip")
    index = abs(hash(request.node.name)) % 10
    topology = Topology(index, tmp_path)
    try:
        topology.up()
        yield topology
    finally:
        topology.down()


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(60)
for _ in range(100):
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""

UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
for attempt in range(5):
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recvfrom(65535)[0].decode())
        break
    except TimeoutError:
        continue
"""


def test_we_initiate_to_wireguard_go(topo: Topology) -> None:
    topo.go_peer()  # wireguard-go learns our endpoint from the handshake
    echo = topo.spawn(topo.go_ns, sys.executable, "-c", UDP_ECHO, GO_IP, "7777")
    peer = PyPeer(topo, endpoint=True)
    peer.ping(1, timeout=10, retries=2)
    done = peer.events("HandshakeCompleted")
    assert done and done[0]["initiator"] is True
    for seq in range(2, 6):
        peer.ping(seq)
    peer.send(cmd="udp", port=7777, data="hello wireguard-go")
    message = peer.wait_for(lambda m: m.get("udp") == "hello wireguard-go", 10)
    assert message["sport"] == 7777
    assert PY_VETH_IP in topo.wg_show("endpoints")
    assert echo.poll() is None


def test_wireguard_go_initiates_to_us(topo: Topology) -> None:
    topo.go_peer("endpoint", f"{PY_VETH_IP}:{PY_PORT}")
    peer = PyPeer(topo, endpoint=False)
    result = topo.go_exec(sys.executable, "-c", PING, PY_IP, "3", "5")
    assert result.stdout.strip() == "3", result.stdout + result.stderr
    done = peer.events("HandshakeCompleted") or [
        peer.wait_for(lambda m: m.get("event") == "HandshakeCompleted", 5)
    ]
    assert done[0]["initiator"] is False
    result = topo.go_exec(sys.executable, "-c", UDP_CLIENT, PY_IP, "7", "udp from go")
    assert result.stdout.strip() == "udp from go", result.stderr
    # and we can initiate traffic on the session wireguard-go started
    peer.ping(1)


PING = """
import os, socket, struct, sys, time
def csum(b):
    b += bytes(len(b) % 2)
    t = sum(struct.unpack(f"!{len(b)//2}H", b))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(0.5)
ident, ok = os.getpid() & 0xFFFF, 0
for seq in range(int(sys.argv[2])):
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"x" * 32
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    s.sendto(body, (sys.argv[1], 0))
    end = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < end:
        try:
            data = s.recv(2048)
        except TimeoutError:
            continue
        icmp = data[(data[0] & 15) * 4:]
        if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
            ok += 1
            break
print(ok)
"""

# Bursts of 256 initiations with a valid mac1 every 50 ms: each burst pushes
# wireguard-go's handshake queue past QueueHandshakeSize/8 = 128 (so it stays under
# load, UnderLoadAfterTime = 1 s) without ever filling the 1024-entry queue, which
# would drop our own initiations along with the flood.
FLOOD = """
import hashlib, os, socket, sys, time
key = hashlib.blake2s(b"mac1----" + bytes.fromhex(sys.argv[3])).digest()
packets = []
for _ in range(256):
    body = b"\\x01\\x00\\x00\\x00" + os.urandom(112)
    packets.append(body + hashlib.blake2s(body, digest_size=16, key=key).digest() + bytes(16))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[4], 0))
end = time.monotonic() + float(sys.argv[5])
target = (sys.argv[1], int(sys.argv[2]))
sent = 0
while time.monotonic() < end:
    for p in packets:
        try:
            s.sendto(p, target)
        except OSError:
            pass
    sent += len(packets)
    time.sleep(0.05)
print(sent)
"""


def test_roaming_both_ways(topo: Topology) -> None:
    """Each side changes its UDP port mid-session; the other follows from the first
    authenticated packet (no new handshake needed)."""
    topo.go_peer()
    peer = PyPeer(topo, endpoint=True)
    peer.ping(1, timeout=10, retries=2)
    # we roam: same keys and session, new source port
    peer.send(cmd="rebind", port=PY_PORT + 7)
    peer.wait_for(lambda m: m.get("rebound") == PY_PORT + 7, 5)
    peer.ping(2)
    assert f"{PY_VETH_IP}:{PY_PORT + 7}" in topo.wg_show("endpoints")
    # wireguard-go roams: it moves to a new listen port and talks to us first
    run("ip", "netns", "exec", topo.go_ns, "wg", "set", topo.wg, "listen-port", str(GO_PORT + 7))
    result = topo.go_exec(sys.executable, "-c", PING, PY_IP, "1", "5")
    assert result.stdout.strip() == "1", result.stdout + result.stderr
    moved = peer.wait_for(
        lambda m: m.get("event") == "EndpointChanged" and m["endpoint"][1] == GO_PORT + 7, 5
    )
    assert moved["endpoint"][0] == GO_VETH_IP
    peer.ping(3)
    assert len(peer.events("HandshakeCompleted")) == 1


def test_cookie_reply_under_handshake_flood(topo: Topology) -> None:
    """wireguard-go under load (>= 128 queued handshakes) answers our initiation with a
    cookie reply; our retry carries mac2 and completes the handshake."""
    topo.go_peer()
    flood = topo.spawn(
        topo.py_ns, sys.executable, "-c", FLOOD, GO_VETH_IP, str(GO_PORT),
        topo.go_public.hex(), FLOOD_IP, "40", stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.0)
    peer = PyPeer(topo, endpoint=True)
    peer.send(cmd="ping", seq=1)
    peer.wait_for(lambda m: m.get("event") == "CookieReceived", 10)
    peer.wait_for(lambda m: m.get("event") == "HandshakeCompleted", 25)
    assert flood.poll() is None, "the flood should still be running: mac2 got us through"
    peer.ping(2, timeout=10, retries=2)


def test_we_send_cookie_reply_and_wireguard_go_retries_with_mac2(topo: Topology) -> None:
    """Our device under load answers wireguard-go's initiation with a cookie reply;
    wireguard-go decrypts it (XChaCha20-Poly1305) and its retry carries a valid mac2."""
    topo.go_peer("endpoint", f"{PY_VETH_IP}:{PY_PORT}")
    peer = PyPeer(topo, endpoint=False, under_load=True)
    start = time.monotonic()
    result = topo.go_exec(sys.executable, "-c", PING, PY_IP, "2", "15", timeout=60)
    assert result.stdout.strip() == "2", result.stdout + result.stderr
    done = peer.wait_for(lambda m: m.get("event") == "HandshakeCompleted", 5)
    assert done["initiator"] is False
    # the first initiation got a cookie, so the handshake needed wireguard-go's retry
    assert time.monotonic() - start >= 5.0


TCP_SERVER = """
import hashlib, socket, sys
srv = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
srv.settimeout(60)
conn, _ = srv.accept()
conn.settimeout(60)
digest, total = hashlib.sha256(), 0
while True:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    digest.update(chunk)
    total += len(chunk)
conn.sendall(digest.hexdigest().encode())
conn.close()
print(total)
"""

TCP_CLIENT = """
import hashlib, os, socket, sys, time
data = os.urandom(int(sys.argv[3]))
for attempt in range(50):
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        break
    except OSError:
        time.sleep(0.2)
s.settimeout(60)
start = time.monotonic()
s.sendall(data)
s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(100):
    reply += chunk
elapsed = time.monotonic() - start
ok = reply.decode() == hashlib.sha256(data).hexdigest()
print(ok, round(len(data) * 8 / elapsed / 1e6, 1))
"""


@pytest.mark.parametrize("direction", ["to_go", "from_go", "to_go_v6"])
def test_tcp_transfer_through_tunnel(topo: Topology, direction: str) -> None:
    """Kernel TCP on both ends, our WireGuard in the middle: the namespace of our
    peer reaches the tunnel through a TUN device that interop_peer.py bridges."""
    topo.go_peer("endpoint", f"{PY_VETH_IP}:{PY_PORT}")
    tun = unique_name("wtun", 0)
    peer = PyPeer(topo, endpoint=True, tun=tun)
    run("ip", "-n", topo.py_ns, "addr", "add", f"{PY_IP}/24", "dev", tun)
    run("ip", "-n", topo.py_ns, "-6", "addr", "add", f"{PY_IP6}/64", "dev", tun, "nodad")
    run("ip", "-n", topo.py_ns, "link", "set", tun, "mtu", "1420", "up")
    size = str(4 * 1024 * 1024)
    if direction.startswith("to_go"):
        target = GO_IP6 if direction.endswith("v6") else GO_IP
        server = topo.spawn(topo.go_ns, sys.executable, "-c", TCP_SERVER, target, "9000",
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
        result = run("ip", "netns", "exec", topo.py_ns, sys.executable, "-c", TCP_CLIENT,
                     target, "9000", size, timeout=90)  # fmt: skip
    else:
        server = topo.spawn(topo.py_ns, sys.executable, "-c", TCP_SERVER, PY_IP, "9000",
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
        result = run("ip", "netns", "exec", topo.go_ns, sys.executable, "-c", TCP_CLIENT,
                     PY_IP, "9000", size, timeout=90)  # fmt: skip
    ok, mbps = result.stdout.split()
    assert ok == "True", result.stdout + result.stderr
    out, _ = server.communicate(timeout=30)
    assert out.strip() == size
    print(f"TCP {direction}: {mbps} Mbit/s through our WireGuard")
    peer.wait_for(lambda m: m.get("event") == "HandshakeCompleted", 5)


def test_wg_setconf_reads_our_config_and_we_read_showconf(topo: Topology) -> None:
    config = Config(
        InterfaceConfig(topo.go_private, listen_port=GO_PORT),
        (
            PeerConfig(
                topo.py_public,
                preshared_key=bytes(range(32)),
                allowed_ips=(
                    ipaddress.ip_network("10.77.0.2/32"),
                    ipaddress.ip_network("fd77::/64"),
                ),
                endpoint=(PY_VETH_IP, PY_PORT),
                persistent_keepalive=25,
            ),
        ),
    )
    path = topo.tmp / "wg.conf"
    path.write_text(format_config(config))
    path.chmod(0o600)
    run("ip", "netns", "exec", topo.go_ns, "wg", "setconf", topo.wg, str(path))
    shown = parse_config(run("ip", "netns", "exec", topo.go_ns, "wg", "showconf", topo.wg).stdout)
    assert shown.peers == config.peers
    clamped = bytearray(topo.go_private)  # wg stores the private key clamped (RFC 7748)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    assert shown.interface == InterfaceConfig(bytes(clamped), listen_port=GO_PORT)


@pytest.mark.slow
def test_real_rekey_after_120_seconds(topo: Topology) -> None:
    topo.go_peer()
    peer = PyPeer(topo, endpoint=True, lifetime=200)
    peer.ping(0, timeout=10, retries=2)
    start = time.monotonic()
    seq = 1
    while time.monotonic() - start < 135:
        peer.ping(seq, timeout=10, retries=3)
        seq += 1
        time.sleep(5)
    done = peer.events("HandshakeCompleted")
    assert len(done) >= 2, done
    assert all(d["initiator"] for d in done)
    gap = done[1]["at"] - done[0]["at"]
    assert 120 <= gap < 135, gap
