"""WireGuard's Cython transport path (``netstack/wireguard/_fast.pyx``) and its
pure-Python twin agree.  The device's batch runs (``open_run``/``seal_run``) are covered
by the whole suite on both: ``KAKUREMICHI_NETSTACK_PURE=1 pytest tests/netstack``."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.wireguard import _pure, speedups, transport
from netstack.wireguard.transport import padding_size
from tests.support import need

from .harness import A_IP, B_IP, Clock, ipv4_udp, pair


def fast() -> ModuleType:
    try:
        return importlib.import_module("netstack.wireguard._fast")
    except ImportError:
        need(False, "the Cython extension netstack.wireguard._fast is not built")
        raise


@given(
    st.binary(min_size=32, max_size=32),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=3000),
    st.sampled_from([0, 1, 16, 80, 1280, 1420, 9000]),
)
def test_twins_agree_on_transport_messages(
    key: bytes, receiver: int, counter: int, packet: bytes, mtu: int
) -> None:
    module = fast()
    sealed = module.TransportCipher(key).seal(receiver, counter, packet, mtu)
    assert sealed == _pure.TransportCipher(key).seal(receiver, counter, packet, mtu)
    assert sealed[:4] == b"\x04\0\0\0"
    assert len(sealed) == 32 + len(packet) + padding_size(len(packet), mtu)
    for cipher in (module.TransportCipher(key), _pure.TransportCipher(key)):
        opened = cipher.open(counter, bytearray(sealed))
        assert opened is not None and opened[: len(packet)] == packet
        assert not any(opened[len(packet) :])  # zero padding
        assert cipher.open(counter ^ 1, sealed) is None  # wrong nonce
        forged = bytearray(sealed)
        forged[-1] ^= 0x80
        assert cipher.open(counter, forged) is None
        assert cipher.open(counter, sealed[:31]) is None


def test_transport_cipher_rejects_bad_keys() -> None:
    module = fast()
    for cls in (module.TransportCipher, _pure.TransportCipher):
        with pytest.raises(ValueError):
            cls(bytes(31))


def test_this_run_uses_the_implementation_the_switch_chose() -> None:
    """In this process the engine runs on what the switch chose: the twins in
    scripts/test.sh's ``KAKUREMICHI_NETSTACK_PURE=1`` run (so that run really tests
    ``_pure.py``), the compiled module otherwise (a missing build skips, and fails
    under ``CI=true``)."""
    if os.environ.get("KAKUREMICHI_NETSTACK_PURE") == "1":
        module, name = _pure, "pure"
    else:
        module, name = fast(), "cython"
    assert name == speedups.IMPLEMENTATION
    assert transport.open_run is module.open_run
    assert transport.seal_run is module.seal_run
    clock = Clock()
    net, a, b = pair(clock)
    assert a.send_packet(ipv4_udp(A_IP, B_IP, b"hello"), clock.now)
    net.pump()
    for engine, other in ((a, b), (b, a)):
        peer = engine.peer(other.public_key)
        assert peer is not None and peer.current is not None
        assert type(peer.current.send) is module.TransportCipher
        assert type(peer.current.receive) is module.TransportCipher
