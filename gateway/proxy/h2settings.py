"""Settings of the gateway's HTTP/2 edge (``h2session.py``): what a client may use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class H2Settings:
    """HTTP/2 limits per client connection (RFC 9113 §6.5.2 settings and our budgets).

    A client's buffered request bodies are bounded by the flow-control windows: at
    most ``connection_window`` bytes per connection whatever the number of streams.
    """

    #: offer ``h2`` in TLS ALPN (off: every client speaks HTTP/1.1)
    enabled: bool = True
    #: SETTINGS_MAX_CONCURRENT_STREAMS; streams still being served count even after
    #: the client reset them (a new one beyond is refused with REFUSED_STREAM)
    max_concurrent_streams: int = 100
    #: SETTINGS_INITIAL_WINDOW_SIZE: request body bytes a stream may send ahead
    stream_window: int = 256 * 1024
    #: the connection's receive window over all its streams
    connection_window: int = 1024 * 1024
    #: SETTINGS_MAX_FRAME_SIZE we accept
    max_frame_size: int = 16 * 1024
    #: frames that cost us without carrying a request (PING, SETTINGS, PRIORITY,
    #: unknown types, empty DATA): a budget of ``control_burst`` refilled at
    #: ``control_rate`` per second; spent -> GOAWAY ENHANCE_YOUR_CALM
    control_rate: float = 100.0
    control_burst: int = 1000
    #: streams the client reset (or that we had to refuse) before their answer was
    #: complete, CVE-2023-44487 "rapid reset": the same kind of budget
    reset_rate: float = 50.0
    reset_burst: int = 400
    #: bytes of our output a client may leave unread (control frames it provokes
    #: while not reading); beyond, the connection is dropped
    max_unread_output: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not 1 <= self.max_concurrent_streams <= 10_000:
            raise ValueError("http2 max_concurrent_streams must be 1..10000")
        if not 65_535 <= self.stream_window <= 2**31 - 1:
            raise ValueError("http2 stream_window must be 65535..2^31-1 bytes")
        if not self.stream_window <= self.connection_window <= 2**31 - 1:
            raise ValueError("http2 connection_window must be stream_window..2^31-1 bytes")
        if not 16_384 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError("http2 max_frame_size must be 16384..16777215 bytes")
        for name in ("control_rate", "reset_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"http2 {name} must be > 0")
        for name in ("control_burst", "reset_burst", "max_unread_output"):
            if getattr(self, name) < 1:
                raise ValueError(f"http2 {name} must be >= 1")
