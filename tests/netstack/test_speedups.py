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

from hypothesis import given
from hypothesis import strategies as st

from netstack import _pure
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
