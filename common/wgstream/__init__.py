"""WireGuard datagrams over a WebSocket (TLS) stream, for networks that block UDP.

:mod:`.records` is the record format inside the WebSocket's binary messages (sans-IO);
:mod:`.connection` runs one such WebSocket on an asyncio transport
(:class:`~.connection.DatagramStream`) and opens the agent's side
(:func:`~.connection.open_stream`).  The gateway accepts streams in
``gateway/wgstream.py``; the agent chooses between UDP and the stream per gateway in
``agent/paths.py``.
"""

from .connection import (
    PATH,
    SUBPROTOCOL,
    DatagramStream,
    StreamError,
    StreamSettings,
    client_ssl_context,
    open_stream,
)
from .records import MAX_DATAGRAM, MAX_MESSAGE, RecordError, is_droppable, pack, unpack

__all__ = [
    "MAX_DATAGRAM",
    "MAX_MESSAGE",
    "PATH",
    "SUBPROTOCOL",
    "DatagramStream",
    "RecordError",
    "StreamError",
    "StreamSettings",
    "client_ssl_context",
    "is_droppable",
    "open_stream",
    "pack",
    "unpack",
]
