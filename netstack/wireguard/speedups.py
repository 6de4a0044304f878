"""Chooses WireGuard's transport hot path: the Cython module
(``netstack/wireguard/_fast.pyx``, OpenSSL's libcrypto called directly) or its
pure-Python twin (``netstack/wireguard/_pure.py``, ``cryptography``'s AEAD).

``KAKUREMICHI_NETSTACK_PURE=1`` forces the twin, as for the TCP/IP stack's hot path;
``IMPLEMENTATION`` names the one in use.  Nothing here depends on the TCP/IP stack.
"""

from __future__ import annotations

import os

from . import _pure

IMPLEMENTATION = "pure"

TransportCipher: type[_pure.TransportCipher] = _pure.TransportCipher
open_run = _pure.open_run
seal_run = _pure.seal_run

if os.environ.get("KAKUREMICHI_NETSTACK_PURE") != "1":  # pragma: no branch
    try:
        from . import _fast  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # the extension is not built in this checkout
        pass
    else:
        TransportCipher = _fast.TransportCipher  # type: ignore[assignment,unused-ignore]
        open_run = _fast.open_run  # type: ignore[assignment,unused-ignore]
        seal_run = _fast.seal_run  # type: ignore[assignment,unused-ignore]
        IMPLEMENTATION = "cython"
