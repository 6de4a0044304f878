"""Events produced by the sans-IO cores (frozen dataclasses, one module per layer).

TCP connection events come out of ``TcpConnection.events()``; the ``Stack`` wraps them
in ``TcpConnectionEvent`` (adding the connection they belong to) next to its own
events for listeners and UDP sockets, returned by ``Stack.events()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netstack.tcp import TcpConnection


@dataclass(frozen=True, slots=True)
class TcpEvent:
    """Base class of the events a TCP connection reports."""


@dataclass(frozen=True, slots=True)
class Connected(TcpEvent):
    """The three-way handshake completed (RFC 9293 section 3.5)."""


@dataclass(frozen=True, slots=True)
class DataAvailable(TcpEvent):
    """New in-order bytes can be taken with ``read()``."""


@dataclass(frozen=True, slots=True)
class EndOfStream(TcpEvent):
    """The peer sent FIN: once buffered bytes are read, ``read()`` returns b""."""


@dataclass(frozen=True, slots=True)
class SendSpaceAvailable(TcpEvent):
    """The send buffer, full at the last ``send()``, has room again."""


@dataclass(frozen=True, slots=True)
class ConnectionReset(TcpEvent):
    """The peer reset the connection (``refused``: it answered our SYN with RST)."""

    refused: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionTimedOut(TcpEvent):
    """Retransmissions, SYN retries or keepalive probes ran out (RFC 9293 3.8.3)."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(TcpEvent):
    """Both directions are finished (or we aborted): no more events follow."""


@dataclass(frozen=True, slots=True)
class StackEvent:
    """Base class of the events a ``Stack`` reports."""


@dataclass(frozen=True, slots=True)
class TcpConnectionEvent(StackEvent):
    """``event`` happened on ``connection``."""

    connection: TcpConnection
    event: TcpEvent


@dataclass(frozen=True, slots=True)
class IncomingConnection(StackEvent):
    """A listener on ``port`` has an established connection waiting in ``accept()``."""

    port: int


@dataclass(frozen=True, slots=True)
class UdpDatagramReceived(StackEvent):
    """A datagram arrived for the UDP socket bound to ``port``."""

    port: int
    local_address: str
    remote_address: str
    remote_port: int
    data: bytes
