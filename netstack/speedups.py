"""Chooses the TCP/IP stack's hot-path implementation: the Cython module
(``netstack/_fast.pyx``) or its pure-Python twin (``netstack/_pure.py``).

Set ``KAKUREMICHI_NETSTACK_PURE=1`` to force the twin (tests run against both); the
same variable chooses the checksum (``netstack/checksum.py``) and WireGuard's transport
path (``netstack/wireguard/speedups.py``).  ``IMPLEMENTATION`` names the one in use.
"""

from __future__ import annotations

import os

from netstack import _pure

IMPLEMENTATION = "pure"

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
        parse_tcp_packet = _fast.parse_tcp_packet
        build_tcp_packet = _fast.build_tcp_packet
        tcp_receive_established = _fast.tcp_receive_established
        tcp_receive_run = _fast.tcp_receive_run
        tcp_send_run = _fast.tcp_send_run
        IMPLEMENTATION = "cython"
