"""The Cython hot path and its pure-Python twin agree; the switch forces the twin.

Run the whole suite against each: ``KAKUREMICHI_NETSTACK_PURE=1 pytest tests/netstack``
uses the twin everywhere; without it the extension is used when built.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack import _pure
from netstack.wireguard.device import padding_size
from tests.support import need


def fast() -> ModuleType:
    try:
        return importlib.import_module("netstack._fast")
    except ImportError:
        need(False, "the Cython extension netstack._fast is not built")
        raise


@given(st.binary(max_size=2000), st.integers(0, 0xFFFF))
def test_twins_agree_on_checksums(data: bytes, initial: int) -> None:
    module = fast()
    assert module.checksum(data, initial) == _pure.checksum(data, initial)
    assert module.ones_sum(bytearray(data), initial) == _pure.ones_sum(data, initial)
    assert module.ones_sum(memoryview(data), initial) == _pure.ones_sum(data, initial)


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16), st.integers(0, 255))
def test_twins_agree_on_pseudo_headers(v4: bytes, v6: bytes, protocol: int) -> None:
    module = fast()
    for src in (v4, v6):
        for length in (0, 20, 1480, 70000):
            assert module.pseudo_header_sum(src, src[::-1], protocol, length) == (
                _pure.pseudo_header_sum(src, src[::-1], protocol, length)
            )


def test_environment_switch_forces_the_twin() -> None:
    code = "import netstack.speedups as s; print(s.IMPLEMENTATION)"
    env = {**os.environ, "KAKUREMICHI_NETSTACK_PURE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "pure"
    env.pop("KAKUREMICHI_NETSTACK_PURE")
    fast()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "cython"


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
