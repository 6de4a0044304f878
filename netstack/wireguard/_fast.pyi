"""Type stub of WireGuard's Cython transport path (twin: ``netstack/wireguard/_pure.py``)."""

from collections.abc import Callable
from typing import Any

class TransportCipher:
    def __init__(self, key: bytes) -> None: ...
    def seal(self, receiver: int, counter: int, packet: bytes | bytearray, mtu: int) -> bytes: ...
    def open(self, counter: int, data: bytes | bytearray | memoryview) -> bytes | None: ...

def open_run(
    batch: list[tuple[bytes, Any]],
    start: int,
    cipher: TransportCipher,
    replay: Any,
    receiver: int,
    addr: Any,
    peer: object,
    cache: dict[bytes, Any],
    lookup: Callable[[bytes], object],
    packets: list[bytes],
    limit: int,
) -> tuple[int, int, int]: ...
def seal_run(
    packets: list[bytes],
    start: int,
    cipher: TransportCipher,
    receiver: int,
    counter: int,
    limit: int,
    mtu: int,
    max_size: int,
    endpoint: Any,
    peer: object,
    cache: dict[bytes, Any],
    out: list[tuple[bytes, Any]],
) -> tuple[int, int, int]: ...
