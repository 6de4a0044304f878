"""Type stub of the Cython hot path (twin: ``netstack/_pure.py``)."""

from collections.abc import Callable
from typing import Any

def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int: ...
def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int: ...
def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int: ...

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
def parse_tcp_packet(packet: bytes, segment_type: Any) -> tuple[bytes, bytes, Any] | None: ...
def build_tcp_packet(segment: Any, src: bytes, dst: bytes) -> bytes: ...
def tcp_receive_established(conn: Any, seg: Any, now: float) -> bool: ...
def tcp_receive_run(
    packets: list[bytes],
    start: int,
    now: float,
    local: frozenset[bytes],
    conns: dict[Any, Any],
    dirty: dict[Any, None],
    fast_states: frozenset[Any],
    segment_type: Any,
) -> tuple[int, tuple[bytes, bytes, Any] | None]: ...
def tcp_send_run(
    conn: Any,
    template: Any,
    out: list[Any],
    pipe: int,
    data_end: int,
    fin: int | None,
    mss: int,
    limit: int,
    now: float,
    wire: tuple[bytes, bytes] | None,
) -> tuple[int, int]: ...
