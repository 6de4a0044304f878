"""The pieces every part of a TCP connection shares: states, tunables, sequence-number
arithmetic and ``TcpBase``, the connection's fields and small helpers.

``TcpConnection`` (``tcp.py``) is ``TcpBase`` + ``SendSide`` (``tcpsend.py``: ACK
processing, congestion control and loss recovery, transmission) + ``ReceiveSide``
(``tcprecv.py``: in-order and out-of-order data, the advertised window, FIN).  The
module docstring of ``tcp.py`` is the theory of operation of the whole.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from netstack import congestion
from netstack import events as ev
from netstack.rack import Rack, SendLog
from netstack.sendbuf import SendBuffer
from netstack.tcpwire import TcpSegment

MASK32 = 0xFFFFFFFF
_MAX_SACK_RANGES = 256
_MAX_SEGMENTS_PER_CALL = 4096
_MAX_REORDERING = 300  # segments, as Linux's net.ipv4.tcp_max_reordering
_PERSIST_MAX = 60.0
_INFINITY = float("inf")


class TcpState(enum.Enum):
    """Connection states of RFC 9293 section 3.3.2 (LISTEN lives in the Stack)."""

    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"
    CLOSED = "CLOSED"

    # Members are singletons: identity hashing keeps the per-segment state checks
    # (frozenset membership) off Enum's Python-level __hash__.
    __hash__ = object.__hash__


_SEND_STATES = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.CLOSE_WAIT,
        TcpState.FIN_WAIT_1,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
    }
)
_RECEIVE_DATA_STATES = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})
FAST_STATES = _RECEIVE_DATA_STATES  # where the established-state hot path may apply
_APP_SEND_STATES = frozenset(
    {TcpState.SYN_SENT, TcpState.SYN_RECEIVED, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT}
)


class TcpStateError(RuntimeError):
    """An application call that the connection's state does not allow."""


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Tunables of one connection (defaults follow Linux where it matters)."""

    mss: int = 1460  # what we advertise: MTU minus IP and TCP headers
    send_buffer: int = 4 * 1024 * 1024
    receive_buffer: int = 256 * 1024  # initial; auto-tuning grows it
    receive_buffer_max: int = 6 * 1024 * 1024
    window_scaling: bool = True
    sack: bool = True
    timestamps: bool = True
    initial_window_segments: int = 10
    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 120.0
    max_retries: int = 15
    syn_retries: int = 6
    synack_retries: int = 5
    delayed_ack: float = 0.04
    quickack_segments: int = 16
    time_wait: float = 60.0
    keepalive_idle: float | None = None
    keepalive_interval: float = 75.0
    keepalive_count: int = 9
    tail_loss_probe: bool = True
    # Added to the probe timeout when one segment is in flight, for the peer's delayed
    # ACK (RFC 8985 7.2 WCDelAckT): Linux's smallest delayed-ACK timeout plus a margin.
    # A probe that was not needed costs one segment, a late one a round trip's stall.
    tlp_max_ack_delay: float = 0.05
    rack: bool = True  # RACK-TLP loss detection with SACK (RFC 8985); False: DupThresh
    congestion_control: str = "cubic"  # or "newreno", "bbr" (netstack.congestion.NAMES)
    pacing: bool = False  # pace CUBIC/NewReno too (BBR always paces)

    def __post_init__(self) -> None:
        congestion.make(self.congestion_control)  # ValueError names the bad value
        if not 0.0 <= self.tlp_max_ack_delay <= 1.0:
            raise ValueError("tlp_max_ack_delay must be 0..1 s")


def _unwrap(wire: int, base: int, reference: int) -> int:
    """The offset (from ``base``) of 32-bit ``wire`` nearest to offset ``reference``."""
    delta = (wire - base - reference) & MASK32
    if delta >= 0x80000000:
        delta -= 0x100000000
    return reference + delta


def _window_shift(buffer_max: int) -> int:
    shift = 0
    while (0xFFFF << shift) < buffer_max and shift < 14:
        shift += 1
    return shift


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``(start, end)`` ranges covering the same bytes."""
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for s, e in ranges:
        if merged and s <= merged[-1][1]:
            if e > merged[-1][1]:
                merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


# The hot path's contract (STYLE.md 15).  ``netstack/_fast.pyx`` reads and writes a
# connection's fields through its ``__dict__`` (``d["_snd_una"]``), which Cython cannot
# check when it builds, and its twin ``netstack/_pure.py`` reads the same fields as
# attributes.  These sets are the only names either may use on a connection and on the
# parts it reaches through it; ``TcpBase.__init__`` sets every field as a plain instance
# attribute (a property or a slot would not be in ``__dict__``).
# ``tests/netstack/test_fast_contract.py`` checks the two hot paths' sources and a real
# connection against them, so renaming a field on any side fails there, not as a
# ``KeyError`` on the hot path.

#: connection fields the hot paths read or write
HOT_PATH_FIELDS = frozenset(
    {
        "_ack_deadline",
        "_ack_now",
        "_ack_pending",
        "_cc",
        "_cwnd",
        "_discard_input",
        "_dupacks",
        "_fin_offset",
        "_high_rxt",
        "_in_recovery",
        "_irs",
        "_iss",
        "_keepalive_probes",
        "_last_ack_sent",
        "_last_receive",
        "_max_snd_wnd",
        "_ooo",
        "_persist_backoff",
        "_persist_deadline",
        "_quickack",
        "_rcv_adv",
        "_rcv_nxt",
        "_rcv_rtt",
        "_rcv_space_time",
        "_rcvbuf",
        "_retries",
        "_rto",
        "_rto_deadline",
        "_rtt_seq",
        "_rtt_time",
        "_sacked",
        "_send_blocked",
        "_snd_max",
        "_snd_mss",
        "_snd_nxt",
        "_snd_una",
        "_snd_wl1",
        "_snd_wl2",
        "_snd_wnd",
        "_snd_wscale",
        "_sndbuf",
        "_sndbuf_start",
        "_srtt",
        "_ssthresh",
        "_tlp_deadline",
        "_tlp_new_data",
        "_tlp_out",
        "_ts_offset",
        "_ts_ok",
        "_ts_recent",
        "_undo_pending",
        "config",
        "state",
    }
)
#: methods and properties of the connection they call
HOT_PATH_METHODS = frozenset(
    {"_arm_tail_loss_probe", "_autotune", "_emit", "_rtt_sample", "_ts_now", "send_buffer_space"}
)
#: ``TcpConfig`` fields they read (through ``config``)
HOT_PATH_CONFIG = frozenset({"delayed_ack", "send_buffer"})
#: ``SendBuffer`` members they use (through ``_sndbuf``; the chunks are read in place)
HOT_PATH_SEND_BUFFER = frozenset({"_chunks", "_first", "_head", "_starts", "consume", "peek"})
#: the congestion controller's method they call (through ``_cc``)
HOT_PATH_CONGESTION = frozenset({"on_ack"})


class TcpBase:
    """The fields of one connection and the helpers all its parts use (the hot path
    uses those named in ``HOT_PATH_FIELDS`` and ``HOT_PATH_METHODS``)."""

    def __init__(
        self,
        *,
        local_port: int,
        remote_port: int,
        iss: int,
        ts_offset: int,
        now: float,
        config: TcpConfig,
    ) -> None:
        self.local_port = local_port
        self.remote_port = remote_port
        self.config = config
        self.state = TcpState.SYN_SENT
        self._events: list[ev.TcpEvent] = []
        self._control: list[TcpSegment] = []  # RSTs, challenge ACKs, probes
        # Send sequence space (offsets from ISS).
        self._iss = iss & MASK32
        self._snd_una = 0
        self._snd_nxt = 0
        self._snd_max = 0
        self._sndbuf = SendBuffer()
        self._sndbuf_start = 1
        self._fin_offset: int | None = None  # offset of our FIN once close() was called
        self._send_blocked = False
        self._snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self._max_snd_wnd = 0
        # Negotiated options.
        self._ts_offset = ts_offset & MASK32
        self._ts_ok = config.timestamps
        self._sack_ok = config.sack
        self._rcv_wscale = _window_shift(config.receive_buffer_max) if config.window_scaling else 0
        self._snd_wscale = 0
        self._wscale_ok = config.window_scaling
        self._peer_mss = 536
        # ``_send_mss()`` and the data MSS without SACK blocks, kept by ``_fix_mss``
        # whenever ``_peer_mss`` or ``_ts_ok`` changes (only when a SYN is taken).
        self._snd_mss = 0
        self._snd_data_mss = 0
        self._fix_mss()
        # Congestion control and loss recovery.
        self._cwnd = 0
        self._ssthresh = 1 << 40
        self._cc = congestion.make(config.congestion_control)
        self._dupacks = 0
        self._reordering = 3  # DupThresh, raised when reordering is seen
        self._rexmit_high = 0  # bytes below may have been sent twice: no reordering proof
        self._loss_recover = 0  # SND.MAX at the last RTO
        self._in_recovery = False
        self._recover = 0
        self._high_rxt = 0
        self._sacked: list[tuple[int, int]] = []  # sorted disjoint ranges above SND.UNA
        # RACK-TLP (netstack/rack.py): when each outstanding byte was last sent, RACK's
        # state, the ranges it marked lost and not yet re-sent, and its reorder timer.
        self._sent_log = SendLog()
        self._rack = Rack()
        self._lost: list[tuple[int, int]] = []
        self._newly_sacked: list[tuple[int, int]] = []  # by the ACK being processed
        self._rack_deadline: float | None = None
        self._min_rtt = _INFINITY
        self._ack_tsecr: int | None = None  # TSecr of the ACK RACK is looking at
        # Proportional rate reduction in recovery (RFC 6937).
        self._prr_delivered = 0
        self._prr_out = 0
        self._recover_fs = 1
        # Delivery-rate sampling for a model-based controller (BBR) and pacing.
        self._cc_model = self._cc.model_based
        if self._cc_model:
            self._ssthresh = 0  # the model owns cwnd: no slow start of the connection's
        self._delivered = 0  # SND.UNA + SACKed bytes at the last look
        self._delivered_time = now  # when that last moved
        self._first_sent = now  # when the most recently delivered bytes had been sent
        self._marked_seen = 0  # RACK's bytes marked lost, as the controller last saw them
        self._app_limited = 0  # nonzero: samples sent before this delivered count are
        self._pacing = config.pacing or self._cc_model
        self._pace_rate = 0.0  # bytes per second (0: not paced yet)
        self._pace_tokens = 0.0
        self._pace_time = now
        self._pace_deadline: float | None = None
        # RTT / RTO (RFC 6298).
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = config.initial_rto
        self._rto_deadline: float | None = None
        self._retries = 0
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        # Receive sequence space (offsets from IRS).
        self._irs = 0
        self._rcv_nxt = 0
        self._rcv_adv = 0
        self._rcv_cap = min(config.receive_buffer, config.receive_buffer_max)
        self._rcvbuf = bytearray()
        self._ooo: dict[int, bytes] = {}
        self._ooo_ranges: list[tuple[int, int]] = []
        self._ooo_bytes = 0
        self._last_ooo: tuple[int, int] | None = None
        self._rcv_fin: int | None = None
        self._eof = False
        self._discard_input = False
        self._ts_recent = 0
        self._last_ack_sent = 0
        self._rcv_read = 0
        self._rcv_space_time = now
        self._rcv_rtt: float | None = None
        # ACK scheduling.
        self._ack_now = False
        self._ack_pending = 0
        self._ack_deadline: float | None = None
        self._quickack = config.quickack_segments
        # Other timers.
        self._persist_deadline: float | None = None
        self._persist_backoff = 0
        self._time_wait_deadline: float | None = None
        self._keepalive_probes = 0
        self._last_receive = now
        self._syn_retries_left = config.syn_retries
        self._closed_reported = False
        self._syn_due = False
        # Tail loss probe (RFC 8985 section 7).
        self._tlp_deadline: float | None = None
        self._tlp_out = False
        self._tlp_new_data = False
        # Eifel undo of spurious retransmissions (RFC 3522), from timestamps.
        self._undo_pending = False
        self._undo_cwnd = 0
        self._undo_ssthresh = 0
        self._undo_cc: tuple[float, ...] = ()
        self._undo_seq = 0
        self._undo_degree = 0
        self._undo_tsval: int | None = None
        self._undo_rto = False  # the undo pending is of an RTO (F-RTO's question)
        # Counters for tests, benchmarks and metrics.
        self.stats_undo = 0
        self.stats_tlp = 0
        self.stats_rto = 0
        self.stats_recoveries = 0
        self.stats_retransmitted = 0
        self.stats_reordering = 0  # times reordering was seen
        self.stats_spurious_rto = 0
        self.stats_dsack = 0
        self.stats_paced = 0  # _transmit calls the pacing budget cut short
        self.notify: object = None  # set by the Stack: called when output may be pending

    @property
    def send_buffer_space(self) -> int:
        """How many more bytes ``send()`` would accept now."""
        return max(0, self.config.send_buffer - len(self._sndbuf))

    def _poke(self) -> None:
        notify = self.notify
        if callable(notify):
            notify(self)

    def _fix_mss(self) -> None:
        """Recompute the cached MSS fields; call after ``_peer_mss`` or ``_ts_ok``
        changes (``config`` never does)."""
        self._snd_mss = max(64, min(self._peer_mss, self.config.mss))
        self._snd_data_mss = self._snd_mss - 12 if self._ts_ok else self._snd_mss

    def _send_mss(self) -> int:
        """Largest payload plus options per segment towards the peer (RFC 9293 3.7.1)."""
        return self._snd_mss

    def _data_mss(self) -> int:
        """Largest payload per segment: ``_send_mss`` less the options it carries."""
        if self._sack_ok and self._ooo_ranges:
            return self._snd_data_mss - (
                4 + 8 * min(len(self._ooo_ranges), 3 if self._ts_ok else 4)
            )
        return self._snd_data_mss

    def _ts_now(self, now: float) -> int:
        return (int(now * 1000) + self._ts_offset) & MASK32

    def _emit(self, event: ev.TcpEvent) -> None:
        self._events.append(event)

    def _enter_closed(self) -> None:
        self.state = TcpState.CLOSED
        self._rto_deadline = None
        self._tlp_deadline = None
        self._rack_deadline = None
        self._pace_deadline = None
        self._ack_deadline = None
        self._persist_deadline = None
        self._time_wait_deadline = None
        self._ack_now = False
        self._sndbuf.clear()
        self._ooo.clear()
        self._ooo_ranges.clear()
        if not self._closed_reported:
            self._closed_reported = True
            self._emit(ev.ConnectionClosed())

    def _enter_time_wait(self, now: float) -> None:
        self.state = TcpState.TIME_WAIT
        self._rto_deadline = None
        self._tlp_deadline = None
        self._rack_deadline = None
        self._pace_deadline = None
        self._persist_deadline = None
        self._time_wait_deadline = now + self.config.time_wait
        if not self._closed_reported:
            self._closed_reported = True
            self._emit(ev.ConnectionClosed())

    # Defined by TcpConnection (tcp.py); declared here for the parts that call it.

    def _segment(
        self,
        seq_offset: int,
        flags: int,
        payload: bytes = b"",
        now: float | None = None,
    ) -> TcpSegment:
        raise NotImplementedError
