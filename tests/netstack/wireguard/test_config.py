"""wg-quick configuration parsing, writing and applying."""

from __future__ import annotations

import base64
import ipaddress
import shutil
import subprocess

import pytest

from netstack.wireguard.config import (
    apply_peers,
    decode_key,
    format_config,
    parse_config,
    parse_endpoint,
)
from netstack.wireguard.errors import ConfigError

from .harness import Clock, keypair, make_engine

PRIV = base64.b64encode(keypair(1)[0]).decode()
PUB2 = base64.b64encode(keypair(2)[1]).decode()
PUB3 = base64.b64encode(keypair(3)[1]).decode()
PSK = base64.b64encode(bytes(range(32))).decode()

SAMPLE = f"""
# an agent
[Interface]
PrivateKey = {PRIV}
ListenPort = 51820
Address = 100.64.1.100/24, fd00::64/64
MTU = 1380
DNS = 1.1.1.1

[Peer]  # gateway 1
PublicKey = {PUB2}
PresharedKey = {PSK}
AllowedIPs = 100.64.1.1/32, fd00::1/128
AllowedIPs = 10.0.0.0/8
Endpoint = 192.0.2.1:51820
PersistentKeepalive = 25

[peer]
publickey = {PUB3}
endpoint = [2001:db8::1]:443
"""


def test_parse_sample() -> None:
    config = parse_config(SAMPLE)
    iface = config.interface
    assert iface.private_key == keypair(1)[0]
    assert iface.listen_port == 51820
    assert iface.mtu == 1380
    assert [str(a) for a in iface.addresses] == ["100.64.1.100/24", "fd00::64/64"]
    assert iface.extra == (("DNS", "1.1.1.1"),)
    first, second = config.peers
    assert first.public_key == keypair(2)[1]
    assert first.preshared_key == bytes(range(32))
    assert [str(n) for n in first.allowed_ips] == ["100.64.1.1/32", "fd00::1/128", "10.0.0.0/8"]
    assert first.endpoint == ("192.0.2.1", 51820)
    assert first.persistent_keepalive == 25
    assert second.endpoint == ("2001:db8::1", 443)
    assert second.allowed_ips == ()


def test_round_trip() -> None:
    config = parse_config(SAMPLE)
    assert parse_config(format_config(config)) == config


def test_key_encoding_matches_wg_pubkey() -> None:
    """Our base64 key encoding agrees with ``wg pubkey`` (when wg is installed)."""
    wg = shutil.which("wg")
    if wg is None:
        pytest.skip("wg not installed")
    out = subprocess.run([wg, "pubkey"], input=PRIV, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == base64.b64encode(keypair(1)[1]).decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "exactly one [Interface]"),
        ("[Interface]\n", "PrivateKey is required"),
        (f"[Interface]\nPrivateKey = {PRIV}\n[Interface]\nPrivateKey = {PRIV}\n", "exactly one"),
        ("[Interface]\nPrivateKey = abc\n", "line 2: PrivateKey: not valid base64"),
        ("[Interface]\nPrivateKey = YWJj\n", "a key is 32 bytes"),
        (f"[Interface]\nPrivateKey = {PRIV}\nListenPort = 70000\n", "ListenPort: 70000"),
        (f"[Interface]\nPrivateKey = {PRIV}\nBogus = 1\n", "line 3: Bogus: unknown"),
        (
            f"[Interface]\nPrivateKey = {PRIV}\n[Peer]\nAllowedIPs = 1.2.3.4/32\n",
            "PublicKey is required",
        ),
        (
            f"[Interface]\nPrivateKey = {PRIV}\n[Peer]\nPublicKey = {PUB2}\nAllowedIPs = 1.2.3/40\n",
            "line 5: AllowedIPs",
        ),
        (
            f"[Interface]\nPrivateKey = {PRIV}\n[Peer]\nPublicKey = {PUB2}\nEndpoint = host\n",
            "Endpoint",
        ),
        (
            f"[Interface]\nPrivateKey = {PRIV}\n[Peer]\nPublicKey = {PUB2}\n[Peer]\nPublicKey = {PUB2}\n",
            "two [Peer]",
        ),
        ("PrivateKey = x\n", "outside of a section"),
        ("[Nope]\n", "unknown section"),
        ("[Interface]\njunk\n", "expected Key = Value"),
    ],
)
def test_errors_name_the_setting(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(text)


def test_endpoint_and_key_helpers() -> None:
    assert parse_endpoint("example.com:51820") == ("example.com", 51820)
    assert parse_endpoint("[::1]:1") == ("::1", 1)
    for bad in ("::1:5", "x:0", "x:y", "[::1]5", ":5"):
        with pytest.raises(ConfigError):
            parse_endpoint(bad)
    with pytest.raises(ConfigError):
        decode_key("!!!")


def test_apply_peers_adds_updates_removes() -> None:
    clock = Clock()
    device = make_engine(1, clock)
    stale = make_engine(9, clock).public_key
    device.set_peer(stale, allowed_ips=["10.9.9.9/32"])
    apply_peers(parse_config(SAMPLE), device)
    assert set(device.peers) == {keypair(2)[1], keypair(3)[1]}
    nets = device.allowed_ips(keypair(2)[1])
    assert ipaddress.ip_network("10.0.0.0/8") in nets
    peer = device.peer(keypair(2)[1])
    assert peer is not None and peer.persistent_keepalive == 25
    assert peer.endpoint == ("192.0.2.1", 51820)
