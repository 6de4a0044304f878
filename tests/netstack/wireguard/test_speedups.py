"""WireGuard's Cython transport path (``netstack/wireguard/_fast.pyx``) and its
pure-Python twin agree.  The device's batch runs (``open_run``/``seal_run``) are covered
by the whole suite on both: ``KAKUREMICHI_NETSTACK_PURE=1 pytest tests/netstack``."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.wireguard import _pure
from netstack.wireguard.device import padding_size
from tests.support import need


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
