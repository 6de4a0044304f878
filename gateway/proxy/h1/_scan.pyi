"""Types of the Cython scanner of plain HTTP/1.1 heads (``_scan.pyx``)."""

def scan_request(
    buf: bytes, max_head: int
) -> (
    tuple[
        int,
        bytes,
        bytes,
        bytes,
        list[tuple[bytes, bytes]],
        int,
        bytes | None,
        list[bytes],
        list[bytes],
        bytes | None,
    ]
    | None
): ...
def scan_response(
    buf: bytes, max_head: int
) -> (
    tuple[
        int,
        int,
        bytes,
        bytes,
        list[tuple[bytes, bytes]],
        bytes | None,
        list[bytes],
        list[bytes],
        bytes | None,
    ]
    | None
): ...
