"""Type stub of the TCP/IP stack's Cython hot path (twin: ``netstack/_pure.py``; the
checksum's: ``netstack/checksum.py``)."""

from typing import Any

def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int: ...
def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int: ...
def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int: ...
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
