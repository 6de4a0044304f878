"""How the data path opens streams: the ``Dialer`` shape and the kernel-TCP default.

The gateway dials agents through WireGuard (kernel sockets or its user-space stack),
the agent dials local services; both hand the proxies and forwarders a ``Dialer`` so
neither cares which network the stream runs over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Dialer = Callable[[str, int, float], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def open_tcp(
    host: str,
    port: int,
    timeout: float,  # noqa: ASYNC109 - the dialer interface takes a timeout
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The default dialer: a kernel TCP connection with a connect timeout."""
    return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
