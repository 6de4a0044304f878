"""Chooses the hot-path implementation: the Cython module or its pure-Python twin.

Set ``KAKUREMICHI_NETSTACK_PURE=1`` to force the twin (tests run against both).
``IMPLEMENTATION`` names the one in use.
"""

from __future__ import annotations

import os

from netstack import _pure

IMPLEMENTATION = "pure"

checksum = _pure.checksum
ones_sum = _pure.ones_sum
pseudo_header_sum = _pure.pseudo_header_sum
TransportCipher: type[_pure.TransportCipher] = _pure.TransportCipher
open_run = _pure.open_run
seal_run = _pure.seal_run
parse_tcp_packet = _pure.parse_tcp_packet
build_tcp_packet = _pure.build_tcp_packet
tcp_receive_established = _pure.tcp_receive_established
tcp_receive_run = _pure.tcp_receive_run
tcp_send_run = _pure.tcp_send_run

if os.environ.get("KAKUREMICHI_NETSTACK_PURE") != "1":  # pragma: no branch
    try:
        from netstack import _fast  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # the extension is not built in this checkout
        pass
    else:
        checksum = _fast.checksum
        ones_sum = _fast.ones_sum
        pseudo_header_sum = _fast.pseudo_header_sum
        TransportCipher = _fast.TransportCipher  # type: ignore[assignment,unused-ignore]
        open_run = _fast.open_run  # type: ignore[assignment,unused-ignore]
        seal_run = _fast.seal_run  # type: ignore[assignment,unused-ignore]
        parse_tcp_packet = _fast.parse_tcp_packet
        build_tcp_packet = _fast.build_tcp_packet
        tcp_receive_established = _fast.tcp_receive_established
        tcp_receive_run = _fast.tcp_receive_run
        tcp_send_run = _fast.tcp_send_run
        IMPLEMENTATION = "cython"
