"""The TCP connection state machine, sans-IO (RFC 9293 and what Linux expects of a peer).

Theory of operation
-------------------
A ``TcpConnection`` is fed ``receive(segment, now)`` and ``handle_timer(now)``; the
application calls ``send()``, ``read()``, ``close()`` (half-close: FIN after the queued
bytes) and ``abort()`` (RST).  Output is pulled with ``segments_to_send(now)``, events
with ``events()``, and the single timer with ``next_deadline()``.  It never reads a
clock or a random source: ISN and timestamp offset are given by the caller (RFC 9293
section 3.4.1; RFC 7323 section 5.4).

Sequence numbers are handled as unbounded *offsets* from the ISNs (SYN = 0, first data
byte = 1) and wrapped to 32 bits only on the wire (``_unwrap`` picks the offset nearest
a reference), so comparisons below are plain integer comparisons.

Send side: ``_sndbuf`` holds every byte from SND.UNA on (unacknowledged + unsent),
bounded by ``config.send_buffer``.  ``_transmit`` emits as many segments as the
congestion window, the peer's window and sender silly-window avoidance (RFC 9293
3.8.6.2.1, Nagle off) allow -- many segments per call, never one per timer tick.
* RTO per RFC 6298 (Karn's rule; samples from timestamps when negotiated; 200 ms floor
  like Linux; exponential backoff; ``max_retries`` then ``ConnectionTimedOut``).  On an
  RTO we go back to SND.UNA (go-back-N) with cwnd = 1 MSS (RFC 5681 section 3.1).
* Congestion control: slow start with IW10 (RFC 6928) and appropriate byte counting,
  L = 2 (RFC 3465); congestion avoidance and the reduction on loss by CUBIC (RFC 9438,
  the default) or NewReno (``TcpConfig.congestion_control``, see ``congestion.py``);
  NewReno loss recovery (RFC 6582); fast retransmit on 3 duplicate ACKs or
  on SACKed data above a hole (RFC 6675 section 5), loss recovery driven by a "pipe"
  estimate (RFC 6675 section 4): SACKed bytes and un-retransmitted holes below the
  highest SACK are out of the network; without SACK each duplicate ACK stands for one
  segment that left (as Linux's "reno SACK" does); limited transmit (RFC 3042).
* Tail loss probe (RFC 8985 section 7): 2 SRTT after the last send, one new segment
  (or the last one again) elicits the SACK that starts fast recovery instead of an
  RTO; a SACKed probe above a hole marks the hole lost (RACK reduced to that case).
  Early retransmit (RFC 5827) when fewer than four segments are in flight.
* Spurious fast retransmits are undone with timestamps (Eifel, RFC 3522 / RFC 4015).
  RTOs are never undone (go-back-N keeps that path simple); after one, duplicate ACKs
  start no fast recovery until everything then outstanding is acknowledged (RFC 6582
  section 4.1, Linux's Loss state): the re-sent data may still be queued on the path.
* Reordering: when a hole below SACKed data (or behind duplicate ACKs) fills without a
  retransmission, or a fast retransmit proves spurious, the duplicate-ACK threshold
  rises to the reordering seen, up to 300 segments (RFC 4653's idea; Linux's
  tp->reordering).  Bytes that may have been sent twice are no evidence.
* Zero window: persist probes (RFC 9293 3.8.6.1) use the Linux form, an ACK with
  SEQ = SND.UNA - 1, with exponential backoff.  Pure ACKs carry SEQ = the highest
  sequence sent (Linux's tcp_acceptable_seq), so they stay acceptable after an RTO.

Receive side: in-order bytes go to ``_rcvbuf`` until ``read()``; out-of-order segments
wait in ``_ooo`` (bounded by the advertised window) and are reported with SACK blocks,
most recent first (RFC 2018 section 4).  The window never shrinks (RFC 9293 3.8.6),
its right edge moves only in steps of min(buffer/2, MSS) (receiver SWS avoidance,
RFC 9293 3.8.6.2.2) and the buffer grows when the application drains more than half of
it per RTT (receive-window auto-tuning, as Linux's DRS).  ACKs are delayed (40 ms) but
sent for every second segment, immediately at start (quick-ACK), for out-of-order data,
hole fills and FIN (RFC 9293 3.8.6.3; RFC 5681 section 4.2).

Hot path: the common segment once established -- next in order, ACK only, no SACK
blocks, nothing in recovery or reassembly, not the ACK of our FIN -- is handled whole
by ``speedups.tcp_receive_established`` (Cython, or its pure-Python twin), which does
exactly what the general path below would and declines anything else untouched;
``tests/netstack/test_established_path.py`` holds the two to the same packets.

Robustness: PAWS (RFC 7323 section 5), RST and SYN validation with challenge ACKs and
ACK-range checks (RFC 5961 sections 3-5), TIME_WAIT of ``config.time_wait`` seconds
(RFC 9293 3.6.1) which a newer SYN may end (RFC 6191, see ``accepts_new_syn``),
optional keepalive (RFC 9293 3.8.4).
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

from netstack import congestion, speedups
from netstack import events as ev
from netstack.sendbuf import SendBuffer
from netstack.tcpwire import ACK, FIN, PSH, RST, SYN, TcpSegment

MASK32 = 0xFFFFFFFF
_MAX_SACK_RANGES = 256
_MAX_SEGMENTS_PER_CALL = 4096
# In-order, ACK-only segments once established (Cython or its twin); the Stack calls it
# straight from its packet loop too.  Looked up at each call: tests swap it out.
receive_established = speedups.tcp_receive_established
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
FAST_STATES = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})
_RECEIVE_DATA_STATES = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})
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
    congestion_control: str = "cubic"  # or "newreno"

    def __post_init__(self) -> None:
        congestion.make(self.congestion_control)  # ValueError names the bad value


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


class TcpConnection:
    """One TCP connection's state machine; see the module docstring."""

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
        # Counters for tests, benchmarks and metrics.
        self.stats_undo = 0
        self.stats_tlp = 0
        self.stats_rto = 0
        self.stats_recoveries = 0
        self.stats_retransmitted = 0
        self.stats_reordering = 0  # times reordering was seen
        self.notify: object = None  # set by the Stack: called when output may be pending

    # ------------------------------------------------------------------ opening

    @classmethod
    def connect(
        cls,
        *,
        local_port: int,
        remote_port: int,
        iss: int,
        ts_offset: int,
        now: float,
        config: TcpConfig,
    ) -> TcpConnection:
        """An active open: the first ``segments_to_send`` carries our SYN."""
        conn = cls(
            local_port=local_port,
            remote_port=remote_port,
            iss=iss,
            ts_offset=ts_offset,
            now=now,
            config=config,
        )
        return conn

    @classmethod
    def accept(
        cls,
        syn: TcpSegment,
        *,
        iss: int,
        ts_offset: int,
        now: float,
        config: TcpConfig,
    ) -> TcpConnection:
        """A passive open from a SYN that reached a listener (RFC 9293 3.10.7.2)."""
        conn = cls(
            local_port=syn.dst_port,
            remote_port=syn.src_port,
            iss=iss,
            ts_offset=ts_offset,
            now=now,
            config=config,
        )
        conn.state = TcpState.SYN_RECEIVED
        conn._syn_retries_left = config.synack_retries
        conn._take_syn_options(syn)
        return conn

    def _take_syn_options(self, syn: TcpSegment) -> None:
        self._irs = syn.seq
        self._rcv_nxt = 1
        self._peer_mss = syn.mss if syn.mss is not None else 536
        self._ts_ok = self._ts_ok and syn.timestamp is not None
        self._sack_ok = self._sack_ok and syn.sack_permitted
        if self._wscale_ok and syn.wscale is not None:
            self._snd_wscale = syn.wscale
        else:
            self._wscale_ok = False
            self._snd_wscale = 0
            self._rcv_wscale = 0
            self._rcv_cap = min(self._rcv_cap, 0xFFFF)
        if syn.timestamp is not None:
            self._ts_recent = syn.timestamp[0]
        self._snd_wnd = syn.window  # never scaled in a SYN (RFC 7323 section 2.2)
        self._max_snd_wnd = self._snd_wnd
        self._cwnd = self.config.initial_window_segments * self._send_mss()

    # ------------------------------------------------------------------ app API

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes for sending; returns how many fit in the send buffer."""
        if self.state not in _APP_SEND_STATES or self._fin_offset is not None:
            raise TcpStateError(f"cannot send in state {self.state.value}")
        room = self.config.send_buffer - len(self._sndbuf)
        accepted = min(room, len(data))
        if accepted < len(data):
            self._send_blocked = True
        if accepted > 0:
            self._sndbuf.append(data[:accepted] if accepted < len(data) else data)
            self._poke()
        return accepted

    @property
    def send_buffer_space(self) -> int:
        """How many more bytes ``send()`` would accept now."""
        return max(0, self.config.send_buffer - len(self._sndbuf))

    @property
    def bytes_in_send_buffer(self) -> int:
        """Bytes queued and not yet acknowledged by the peer."""
        return len(self._sndbuf)

    def read(self, max_bytes: int = -1) -> bytes:
        """Take up to ``max_bytes`` (all if negative) received in-order bytes."""
        if max_bytes < 0 or max_bytes >= len(self._rcvbuf):
            data = bytes(self._rcvbuf)
            self._rcvbuf.clear()
        else:
            data = bytes(self._rcvbuf[:max_bytes])
            del self._rcvbuf[:max_bytes]
        if data:
            self._rcv_read += len(data)
            self._maybe_window_update()
        return data

    @property
    def readable_bytes(self) -> int:
        """Received in-order bytes waiting for ``read()``."""
        return len(self._rcvbuf)

    @property
    def at_eof(self) -> bool:
        """The peer's FIN arrived and every byte before it has been read."""
        return self._eof and not self._rcvbuf

    def close(self) -> None:
        """Half-close: send FIN after the queued bytes (RFC 9293 3.10.4). Idempotent."""
        if self._fin_offset is not None or self.state in (TcpState.CLOSED, TcpState.TIME_WAIT):
            return
        if self.state is TcpState.SYN_SENT and not self._sndbuf:
            self._enter_closed()  # RFC 9293 3.10.4: nothing queued, delete the TCB
            return
        self._fin_offset = self._sndbuf_start + len(self._sndbuf)
        if self.state is TcpState.ESTABLISHED:
            self.state = TcpState.FIN_WAIT_1
        elif self.state is TcpState.CLOSE_WAIT:
            self.state = TcpState.LAST_ACK
        self._poke()

    def shutdown_read(self) -> None:
        """Discard whatever arrives from now on (the application will not read)."""
        self._discard_input = True
        self._rcvbuf.clear()
        self._maybe_window_update()

    def abort(self) -> None:
        """Reset the connection (RFC 9293 3.10.5) and close it at once."""
        if self.state in (
            TcpState.SYN_RECEIVED,
            TcpState.ESTABLISHED,
            TcpState.FIN_WAIT_1,
            TcpState.FIN_WAIT_2,
            TcpState.CLOSE_WAIT,
        ):
            self._control.append(self._segment(self._snd_max, RST | ACK))
        self._enter_closed()
        self._poke()

    def accepts_new_syn(self, syn: TcpSegment) -> bool:
        """In TIME-WAIT, may this SYN start a new incarnation of the connection?

        RFC 9293 3.6.1 / RFC 6191: yes if its SEQ is beyond what we received, or its
        timestamp is newer than the last one seen (as Linux's tcp_timewait_state_process).
        """
        if self.state is not TcpState.TIME_WAIT:
            return False
        if self._ts_ok and syn.timestamp is not None:
            return 0 < (syn.timestamp[0] - self._ts_recent) & MASK32 < 0x80000000
        return 0 < (syn.seq - self._irs - self._rcv_nxt) & MASK32 < 0x80000000

    @property
    def is_closed(self) -> bool:
        """No more segments will be sent or accepted: the Stack forgets it."""
        return self.state is TcpState.CLOSED

    def events(self) -> list[ev.TcpEvent]:
        """Events since the last call, oldest first."""
        out, self._events = self._events, []
        return out

    # ------------------------------------------------------------------ helpers

    def _poke(self) -> None:
        notify = self.notify
        if callable(notify):
            notify(self)

    def _send_mss(self) -> int:
        """Largest payload plus options per segment towards the peer (RFC 9293 3.7.1)."""
        return max(64, min(self._peer_mss, self.config.mss))

    def _data_mss(self) -> int:
        mss = self._send_mss()
        if self._ts_ok:
            mss -= 12
        if self._sack_ok and self._ooo_ranges:
            mss -= 4 + 8 * min(len(self._ooo_ranges), 3 if self._ts_ok else 4)
        return mss

    def _ts_now(self, now: float) -> int:
        return (int(now * 1000) + self._ts_offset) & MASK32

    def _sack_blocks(self) -> tuple[tuple[int, int], ...]:
        if not (self._sack_ok and self._ooo_ranges):
            return ()
        limit = 3 if self._ts_ok else 4
        ordered = sorted(self._ooo_ranges, reverse=True)
        last = self._last_ooo
        if last is not None:
            for rng in ordered:
                if rng[0] <= last[0] < rng[1]:
                    ordered.remove(rng)
                    ordered.insert(0, rng)
                    break
        irs = self._irs
        return tuple(((irs + s) & MASK32, (irs + e) & MASK32) for s, e in ordered[:limit])

    def _advertise(self) -> int:
        """The window field to send; moves ``_rcv_adv`` (never shrinks it)."""
        free = self._rcv_cap - len(self._rcvbuf)
        right = self._rcv_nxt + max(0, free)
        if right - self._rcv_adv < min(self._rcv_cap // 2, self.config.mss):
            right = max(self._rcv_adv, self._rcv_nxt)
        window = right - self._rcv_nxt
        shift = self._rcv_wscale
        field = window >> shift
        if self._rcv_nxt + (field << shift) < self._rcv_adv:
            field += 1  # round up rather than shrink (as Linux does)
        field = min(field, 0xFFFF)
        self._rcv_adv = max(self._rcv_adv, self._rcv_nxt + (field << shift))
        return field

    def _segment(
        self,
        seq_offset: int,
        flags: int,
        payload: bytes = b"",
        now: float | None = None,
    ) -> TcpSegment:
        """A non-SYN segment at ``seq_offset``; records that an ACK went out."""
        timestamp = None
        if self._ts_ok and now is not None:
            timestamp = (self._ts_now(now), self._ts_recent)
        ack = 0
        window = 0
        sack: tuple[tuple[int, int], ...] = ()
        if flags & ACK:
            ack = (self._irs + self._rcv_nxt) & MASK32
            window = self._advertise()
            sack = self._sack_blocks()
            self._last_ack_sent = self._rcv_nxt
            if seq_offset >= self._snd_max:
                # A retransmission (old SEQ) may be discarded unread by the peer
                # (RFC 9293 3.10.7.4): it does not count as our ACK; a pure one follows.
                self._ack_now = False
                self._ack_pending = 0
                self._ack_deadline = None
        return TcpSegment(
            self.local_port,
            self.remote_port,
            (self._iss + seq_offset) & MASK32,
            ack,
            flags,
            window,
            payload,
            timestamp=timestamp,
            sack_blocks=sack,
        )

    def _syn_segment(self, now: float) -> TcpSegment:
        with_ack = self.state is TcpState.SYN_RECEIVED
        timestamp = None
        if self._ts_ok:
            timestamp = (self._ts_now(now), self._ts_recent if with_ack else 0)
        self._rcv_adv = self._rcv_nxt + min(self._rcv_cap, 0xFFFF)
        return TcpSegment(
            self.local_port,
            self.remote_port,
            self._iss,
            (self._irs + self._rcv_nxt) & MASK32 if with_ack else 0,
            SYN | ACK if with_ack else SYN,
            min(self._rcv_cap, 0xFFFF),
            mss=self.config.mss,
            wscale=self._rcv_wscale if self._wscale_ok else None,
            sack_permitted=self._sack_ok,
            timestamp=timestamp,
        )

    def _emit(self, event: ev.TcpEvent) -> None:
        self._events.append(event)

    def _enter_closed(self) -> None:
        self.state = TcpState.CLOSED
        self._rto_deadline = None
        self._tlp_deadline = None
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
        self._persist_deadline = None
        self._time_wait_deadline = now + self.config.time_wait
        if not self._closed_reported:
            self._closed_reported = True
            self._emit(ev.ConnectionClosed())

    def _maybe_window_update(self) -> None:
        if self.state not in _RECEIVE_DATA_STATES:
            return
        free = self._rcv_cap - len(self._rcvbuf)
        advertised = self._rcv_adv - self._rcv_nxt
        # Tell the peer when the window opened by a useful amount (RFC 9293 3.8.6.2.2);
        # essential after a zero window, when the peer only learns of it from us.
        if free - advertised >= max(2 * self.config.mss, self._rcv_cap // 4) or (
            advertised < self.config.mss <= free
        ):
            self._ack_now = True
            self._poke()

    # ------------------------------------------------------------------ input

    def receive(self, seg: TcpSegment, now: float) -> None:
        """Process one segment addressed to this connection (RFC 9293 3.10.7)."""
        state = self.state
        if state in FAST_STATES and receive_established(self, seg, now):
            return  # the common in-order segment, handled by the hot path
        if state is TcpState.CLOSED:
            return
        self._last_receive = now
        self._keepalive_probes = 0
        if state is TcpState.SYN_SENT:
            self._receive_in_syn_sent(seg, now)
            return
        flags = seg.flags
        seq = _unwrap(seg.seq, self._irs, self._rcv_nxt)
        seg_len = len(seg.payload) + (1 if flags & FIN else 0)
        # PAWS (RFC 7323 section 5.3).
        if (
            self._ts_ok
            and seg.timestamp is not None
            and not flags & RST
            and (seg.timestamp[0] - self._ts_recent) & MASK32 >= 0x80000000
        ):
            self._ack_now = True
            return
        # Acceptability (RFC 9293 3.10.7.4, first check).
        window = max(0, self._rcv_adv - self._rcv_nxt)
        rcv_nxt = self._rcv_nxt
        if seg_len == 0:
            acceptable = seq == rcv_nxt if window == 0 else rcv_nxt <= seq <= rcv_nxt + window
        else:
            acceptable = window > 0 and seq < rcv_nxt + window and seq + seg_len > rcv_nxt
        if not acceptable:
            if flags & RST:
                return
            if state is TcpState.TIME_WAIT and flags & FIN:
                self._time_wait_deadline = now + self.config.time_wait
            self._ack_now = True
            # A zero window still takes ACK information (RFC 9293 3.10.7.4).
            if not (window == 0 and seq == rcv_nxt and flags & ACK):
                return
            seg_len = 0
            flags &= ~FIN
        # RST (RFC 5961 section 3.2): exact match resets, else a challenge ACK.
        if flags & RST:
            if seq == rcv_nxt:
                if state is not TcpState.TIME_WAIT:
                    self._emit(ev.ConnectionReset())
                self._enter_closed()
            else:
                self._ack_now = True
            return
        # SYN in a synchronized state (RFC 5961 section 4.2) -> challenge ACK.
        if flags & SYN:
            if state is TcpState.SYN_RECEIVED and seq == 0:
                self._syn_due = True  # a retransmitted SYN: resend our SYN-ACK
            else:
                self._ack_now = True
            return
        if not flags & ACK:
            return
        if not self._process_ack(seg, seq, now):
            return
        if self.state is TcpState.CLOSED:
            return
        # Timestamps: remember the peer's clock (RFC 7323 section 4.3).
        if self._ts_ok and seg.timestamp is not None and seq <= self._last_ack_sent:
            if (seg.timestamp[0] - self._ts_recent) & MASK32 < 0x80000000:
                self._ts_recent = seg.timestamp[0]
            if seg.payload and seg.timestamp[1]:
                sample = ((self._ts_now(now) - seg.timestamp[1]) & MASK32) / 1000.0
                if sample < 60.0:
                    prev = self._rcv_rtt
                    self._rcv_rtt = (
                        sample if prev is None else min(prev, sample) * 0.9 + sample * 0.1
                    )
        if seg.payload and self.state in _RECEIVE_DATA_STATES:
            self._receive_data(seq, seg.payload, now)
        elif seg.payload and self.state is not TcpState.TIME_WAIT:
            self._ack_now = True  # data after the peer's FIN: just re-ACK
        if flags & FIN:
            self._receive_fin(seq + len(seg.payload), now)

    def _receive_in_syn_sent(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 3.10.7.3."""
        flags = seg.flags
        if flags & ACK:
            ack = _unwrap(seg.ack, self._iss, 0)
            if ack != 1:
                if not flags & RST:
                    self._control.append(
                        TcpSegment(self.local_port, self.remote_port, seg.ack, 0, RST, 0)
                    )
                return
            if flags & RST:
                self._emit(ev.ConnectionReset(refused=True))
                self._enter_closed()
                return
        elif flags & RST:
            return
        if not flags & SYN:
            return
        self._take_syn_options(seg)
        if flags & ACK:
            self._snd_una = 1
            self._snd_nxt = max(self._snd_nxt, 1)
            self._snd_wl1 = 0
            self._snd_wl2 = 1
            self._rto_deadline = None
            self._rcv_adv = self._rcv_nxt
            if self._rtt_seq is not None:
                self._rtt_sample(now - self._rtt_time)
            self._retries = 0
            self.state = TcpState.ESTABLISHED if self._fin_offset is None else TcpState.FIN_WAIT_1
            self._emit(ev.Connected())
            self._ack_now = True
        else:  # simultaneous open (RFC 9293 3.10.7.3, fourth check)
            self.state = TcpState.SYN_RECEIVED
            self._rto_deadline = now

    def _process_ack(self, seg: TcpSegment, seq: int, now: float) -> bool:
        """The ACK field (RFC 9293 3.10.7.4 fifth check); False drops the segment."""
        ack = _unwrap(seg.ack, self._iss, self._snd_una)
        if self.state is TcpState.SYN_RECEIVED:
            if not 0 < ack <= self._snd_max:
                self._control.append(
                    TcpSegment(self.local_port, self.remote_port, seg.ack, 0, RST, 0)
                )
                return False
            self.state = TcpState.ESTABLISHED if self._fin_offset is None else TcpState.FIN_WAIT_1
            self._snd_una = 1
            self._snd_wnd = seg.window << self._snd_wscale
            self._max_snd_wnd = max(self._max_snd_wnd, self._snd_wnd)
            self._snd_wl1 = seq
            self._snd_wl2 = ack
            self._rcv_adv = max(self._rcv_adv, self._rcv_nxt)
            if self._rtt_seq is not None:
                self._rtt_sample(now - self._rtt_time)
                self._rtt_seq = None
            self._rto_deadline = None
            self._retries = 0
            self._emit(ev.Connected())
        # RFC 5961 section 5.2: ACKs outside [SND.UNA - MAX.SND.WND, SND.MAX] are bogus.
        if ack > self._snd_max or ack < self._snd_una - max(self._max_snd_wnd, 1):
            self._ack_now = True
            return False
        new_sack = (
            bool(seg.sack_blocks) and self._sack_ok and self._update_scoreboard(seg.sack_blocks)
        )
        window = seg.window << self._snd_wscale
        old_window = self._snd_wnd
        if self._snd_wl1 < seq or (self._snd_wl1 == seq and self._snd_wl2 <= ack):
            self._snd_wnd = window
            self._snd_wl1 = seq
            self._snd_wl2 = ack
            self._max_snd_wnd = max(self._max_snd_wnd, window)
        if ack > self._snd_una:
            self._ack_advanced(ack, seg, now)
        elif (
            ack == self._snd_una
            and self._snd_max > self._snd_una
            and (new_sack or (not seg.payload and not seg.flags & FIN and window == old_window))
        ):
            # A duplicate ACK (RFC 5681 section 2), or one that SACKs new data
            # (RFC 6675 section 5: the receiver may change its window meanwhile).
            self._duplicate_ack()
        # Our FIN acknowledged? (RFC 9293 3.10.7.4, FIN-WAIT-1 / CLOSING / LAST-ACK)
        fin = self._fin_offset
        if fin is not None and self._snd_una > fin:
            if self.state is TcpState.FIN_WAIT_1:
                self.state = TcpState.FIN_WAIT_2
            elif self.state is TcpState.CLOSING:
                self._enter_time_wait(now)
            elif self.state is TcpState.LAST_ACK:
                self._enter_closed()
                return False
        return True

    def _rtt_sample(self, rtt: float) -> None:
        """RFC 6298 section 2."""
        rtt = max(rtt, 0.0)
        if self._srtt is None:
            self._srtt = rtt
            self._rttvar = rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        rto = self._srtt + max(0.001, 4 * self._rttvar)
        self._rto = min(self.config.max_rto, max(self.config.min_rto, rto))

    def _ack_advanced(self, ack: int, seg: TcpSegment, now: float) -> None:
        acked = ack - self._snd_una
        data_end = self._sndbuf_start + len(self._sndbuf)
        trim = min(ack, data_end) - self._sndbuf_start
        if trim > 0:
            self._sndbuf.consume(trim)
            self._sndbuf_start += trim
        flight_before = self._snd_nxt - self._snd_una
        if (
            not self._in_recovery
            and (self._dupacks or (self._sacked and ack >= self._sacked[0][0]))
            and self._snd_una >= self._rexmit_high
        ):
            # Duplicate ACKs, or a hole below SACKed data, then the hole filled without
            # a retransmission: the segment was reordered, not lost (Linux's
            # tcp_check_sack_reordering).
            fack = self._sacked[-1][1] if self._sacked else self._snd_una
            self._note_reordering(max(self._dupacks, (fack - self._snd_una) // self._send_mss()))
        self._snd_una = ack
        if self._snd_nxt < ack:
            self._snd_nxt = ack
        if self._high_rxt < ack:
            self._high_rxt = ack
        if self._sacked:
            self._sacked = [(max(s, ack), e) for s, e in self._sacked if e > ack]
        # RTT: timestamps on every ACK that advances, else Karn's timed segment.
        if self._ts_ok and seg.timestamp is not None and seg.timestamp[1]:
            sample = ((self._ts_now(now) - seg.timestamp[1]) & MASK32) / 1000.0
            if sample < 60.0:
                self._rtt_sample(sample)
            self._rtt_seq = None
        elif self._rtt_seq is not None and ack > self._rtt_seq:
            self._rtt_sample(now - self._rtt_time)
            self._rtt_seq = None
        self._retries = 0
        mss = self._send_mss()
        if self._undo_pending and ack > self._undo_seq:
            self._check_spurious(seg)
        if self._in_recovery:
            if ack >= self._recover:  # full ACK: leave recovery (RFC 6582 section 3.2 step 3)
                self._in_recovery = False
                self._dupacks = 0
                self._cwnd = max(self._ssthresh, 2 * mss)
            else:  # partial ACK: the next hole is lost too (RFC 6582 section 3.2 step 4)
                self._dupacks = 0
                if not self._sack_ok:
                    self._high_rxt = ack
        else:
            self._dupacks = 0
            cwnd_limited = flight_before + mss >= self._cwnd
            if cwnd_limited:
                if self._cwnd < self._ssthresh:
                    self._cwnd += min(acked, 2 * mss)  # RFC 3465, L = 2
                else:
                    self._cwnd = self._cc.on_ack(self._cwnd, acked, mss, now, self._srtt or 0.0)
                self._cwnd = min(self._cwnd, 2 * self.config.send_buffer)
        self._rto_deadline = None if self._snd_una >= self._snd_max else now + self._rto
        self._tlp_out = False
        self._arm_tail_loss_probe(now)
        if self._send_blocked and self.send_buffer_space > 0:
            self._send_blocked = False
            self._emit(ev.SendSpaceAvailable())

    def _duplicate_ack(self) -> None:
        if not self._in_recovery and (
            self._snd_nxt < self._snd_max or self._snd_una < self._loss_recover
        ):
            # After an RTO until everything then outstanding is acknowledged (Linux's
            # Loss state; RFC 6582 section 4.1): the re-sent data is still in flight,
            # so duplicate ACKs start no fast recovery.  Without SACK the count stands
            # in for the segments that left the network.
            if not self._sack_ok:
                self._dupacks += 1
            return
        self._dupacks += 1
        if self._in_recovery:
            return
        mss = self._send_mss()
        sacked = sum(e - s for s, e in self._sacked)
        threshold = self._reordering
        outstanding = -(-(self._snd_max - self._snd_una) // mss)  # in segments
        data_end = self._sndbuf_start + len(self._sndbuf)
        if outstanding < 4 and (
            self._snd_nxt >= data_end or self._snd_una + self._snd_wnd <= self._snd_nxt
        ):
            # Early retransmit (RFC 5827): too few segments in flight for three
            # duplicate ACKs, and no new data can go out to make more of them.
            threshold = max(1, outstanding - 1)
        if self._tlp_out:
            # The probe went out 2 SRTT after the data below it: if the peer reports
            # the probe but not that data, the data is lost, not reordered (RFC 8985
            # section 7.4, the RACK rule reduced to this one case).
            threshold = 1
        if self._dupacks >= threshold or (self._sack_ok and sacked >= threshold * mss):
            self._undo_degree = min(max(self._dupacks, sacked // mss) + 1, outstanding)
            self._enter_recovery()

    def _note_reordering(self, degree: int) -> None:
        """Reordering of ``degree`` segments was seen: fast retransmit waits for that
        many duplicate ACKs or SACKed segments from now on (RFC 4653's idea; Linux's
        tp->reordering, capped like its tcp_max_reordering)."""
        self.stats_reordering += 1
        if degree > self._reordering:
            self._reordering = min(degree, _MAX_REORDERING)

    def _arm_undo(self) -> None:
        self._undo_pending = self._ts_ok
        self._undo_cwnd = self._cwnd
        self._undo_ssthresh = self._ssthresh
        self._undo_cc = self._cc.snapshot()
        self._undo_seq = self._snd_una
        self._undo_tsval = None

    def _check_spurious(self, seg: TcpSegment) -> None:
        """RFC 3522: the ACK of the first retransmission echoes an older TSval than the
        retransmission carried, so the original arrived: undo the window reduction
        (RFC 4015 response, as Linux's tcp_try_undo_recovery/loss)."""
        self._undo_pending = False
        sent = self._undo_tsval
        if seg.timestamp is None or sent is None or not seg.timestamp[1]:
            return
        if not 0 < (sent - seg.timestamp[1]) & MASK32 < 0x80000000:
            return  # echoes the retransmission (or one as recent): a real loss
        self.stats_undo += 1
        self._cwnd = max(self._cwnd, self._undo_cwnd)
        self._ssthresh = max(self._ssthresh, self._undo_ssthresh)
        self._cc.restore(self._undo_cc)
        self._note_reordering(self._undo_degree)
        if self._in_recovery:
            self._in_recovery = False
            self._dupacks = 0

    def _enter_recovery(self) -> None:
        """Fast retransmit (RFC 5681 section 3.2; RFC 6675 section 5)."""
        self._arm_undo()
        self._ssthresh = self._reduced_window()
        self._cwnd = self._ssthresh
        self._in_recovery = True
        self.stats_recoveries += 1
        self._recover = self._snd_max
        self._high_rxt = self._snd_una

    def _reduced_window(self) -> int:
        """ssthresh after a loss, from the congestion controller.

        FlightSize can exceed cwnd right after recovery (everything sent but lost is
        still outstanding), so the controllers cap it by cwnd, as Linux does.
        """
        return self._cc.on_loss(self._cwnd, self._snd_max - self._snd_una, self._send_mss())

    def _update_scoreboard(self, blocks: tuple[tuple[int, int], ...]) -> bool:
        ranges = self._sacked
        fack = ranges[-1][1] if ranges else 0  # the highest SACKed byte so far
        added: list[tuple[int, int]] = []
        for left_wire, right_wire in blocks:
            left = _unwrap(left_wire, self._iss, self._snd_una)
            right = _unwrap(right_wire, self._iss, self._snd_una)
            left = max(left, self._snd_una)
            if right <= left or right > self._snd_max:
                continue  # D-SACK or bogus: ignored (RFC 2883 is not used)
            if not any(s <= left and right <= e for s, e in ranges):
                if right <= fack and left >= self._rexmit_high:
                    # Newly SACKed below the highest SACK and never re-sent: reordered.
                    self._note_reordering((fack - left) // self._send_mss() + 1)
                added.append((left, right))
        if not added:
            return False
        ranges = ranges + added
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for s, e in ranges:
            if merged and s <= merged[-1][1]:
                if e > merged[-1][1]:
                    merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self._sacked = merged[:_MAX_SACK_RANGES]  # the lowest ranges matter most
        return True

    def _receive_data(self, seq: int, payload: bytes, now: float) -> None:
        rcv_nxt = self._rcv_nxt
        if seq < rcv_nxt:
            payload = payload[rcv_nxt - seq :]
            seq = rcv_nxt
            self._ack_now = True  # (partially) duplicate data: ACK at once
        right = max(self._rcv_adv, rcv_nxt)
        if seq + len(payload) > right:
            payload = payload[: max(0, right - seq)]
        if not payload:
            return
        if seq == rcv_nxt:
            filled = False
            self._deliver(payload)
            if self._ooo:
                filled = True
                self._drain_ooo()
            if filled:
                self._ack_now = True
            else:
                self._ack_pending += 1
                if self._ack_pending >= 2 or self._quickack > 0:
                    self._ack_now = True
                elif self._ack_deadline is None:
                    self._ack_deadline = now + self.config.delayed_ack
            if self._quickack > 0:
                self._quickack -= 1
            self._autotune(now)
        else:
            self._store_ooo(seq, payload)
            self._ack_now = True

    def _deliver(self, payload: bytes) -> None:
        self._rcv_nxt += len(payload)
        if not self._discard_input:
            if not self._rcvbuf:
                self._emit(ev.DataAvailable())
            self._rcvbuf += payload

    def _store_ooo(self, seq: int, payload: bytes) -> None:
        end = seq + len(payload)
        for s, e in self._ooo_ranges:
            if s <= seq and end <= e:
                self._last_ooo = (seq, end)
                return  # already held
        if self._ooo_bytes + len(payload) > self._rcv_cap or len(self._ooo) >= 4096:
            return  # bounded out-of-order queue: drop, the peer will retransmit
        old = self._ooo.get(seq)
        if old is not None and len(old) >= len(payload):
            return
        if old is not None:
            self._ooo_bytes -= len(old)
        self._ooo[seq] = payload
        self._ooo_bytes += len(payload)
        self._last_ooo = (seq, end)
        ranges = [*self._ooo_ranges, (seq, end)]
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for s, e in ranges:
            if merged and s <= merged[-1][1]:
                if e > merged[-1][1]:
                    merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self._ooo_ranges = merged

    def _drain_ooo(self) -> None:
        ooo = self._ooo
        while ooo:
            progressed = False
            for start in sorted(ooo):
                if start > self._rcv_nxt:
                    break
                data = ooo.pop(start)
                self._ooo_bytes -= len(data)
                end = start + len(data)
                if end > self._rcv_nxt:
                    self._deliver(data[self._rcv_nxt - start :])
                progressed = True
            if not progressed:
                break
        self._ooo_ranges = [(s, e) for s, e in self._ooo_ranges if e > self._rcv_nxt]
        if self._ooo_ranges and self._ooo_ranges[0][0] < self._rcv_nxt:
            self._ooo_ranges[0] = (self._rcv_nxt, self._ooo_ranges[0][1])
        if not self._ooo:
            self._ooo_ranges = []
            self._ooo_bytes = 0
        if self._rcv_fin is not None and self._rcv_fin == self._rcv_nxt:
            self._accept_fin()

    def _autotune(self, now: float) -> None:
        """Grow the receive buffer when the reader keeps up (like Linux's DRS)."""
        rtt = self._rcv_rtt if self._rcv_rtt is not None else self._srtt
        interval = max(rtt if rtt is not None else 0.1, 0.005)
        if now - self._rcv_space_time < interval:
            return
        copied = self._rcv_read
        self._rcv_read = 0
        self._rcv_space_time = now
        if copied * 2 > self._rcv_cap // 2 and self._rcv_cap < self.config.receive_buffer_max:
            limit = self.config.receive_buffer_max if self._wscale_ok else 0xFFFF
            self._rcv_cap = min(limit, max(self._rcv_cap * 2, copied * 4))

    def _receive_fin(self, fin_offset: int, now: float) -> None:
        if self.state is TcpState.TIME_WAIT:
            self._ack_now = True
            self._time_wait_deadline = now + self.config.time_wait
            return
        if self._rcv_fin is None:
            self._rcv_fin = fin_offset
        if self._rcv_fin == self._rcv_nxt:
            self._accept_fin(now)
        else:
            self._ack_now = True

    def _accept_fin(self, now: float | None = None) -> None:
        if self._eof:
            self._ack_now = True
            return
        self._rcv_nxt += 1
        self._eof = True
        self._ack_now = True
        self._emit(ev.EndOfStream())
        state = self.state
        if state is TcpState.ESTABLISHED or state is TcpState.SYN_RECEIVED:
            self.state = TcpState.CLOSE_WAIT
        elif state is TcpState.FIN_WAIT_1:
            self.state = TcpState.CLOSING
        elif state is TcpState.FIN_WAIT_2:
            self._enter_time_wait(now if now is not None else self._last_receive)

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """The earliest time ``handle_timer`` must be called, or None."""
        best: float | None = None
        for deadline in (
            self._rto_deadline,
            self._tlp_deadline,
            self._ack_deadline,
            self._persist_deadline,
            self._time_wait_deadline,
            self._keepalive_deadline(),
        ):
            if deadline is not None and (best is None or deadline < best):
                best = deadline
        return best

    def _keepalive_deadline(self) -> float | None:
        idle = self.config.keepalive_idle
        if idle is None or self.state is not TcpState.ESTABLISHED:
            return None
        if self._snd_max > self._snd_una:
            return None
        return self._last_receive + idle + self._keepalive_probes * self.config.keepalive_interval

    def handle_timer(self, now: float) -> None:
        """Run whatever timers are due at ``now``."""
        if self._time_wait_deadline is not None and now >= self._time_wait_deadline:
            self._time_wait_deadline = None
            self._enter_closed()
            return
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._ack_deadline = None
            self._ack_now = True
        if self._rto_deadline is not None and now >= self._rto_deadline:
            self._tlp_deadline = None
            self._on_rto(now)
        if self._tlp_deadline is not None and now >= self._tlp_deadline:
            self._tlp_deadline = None
            self._send_tail_loss_probe(now)
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._persist_backoff += 1
            self._persist_deadline = now + min(
                _PERSIST_MAX, self._rto * (1 << min(self._persist_backoff, 16))
            )
            # Also when the window is open but too small to be worth a segment: the
            # probe fetches the current window, data waits for a useful one.
            self._control.append(self._segment(self._snd_una - 1, ACK, now=now))
        keepalive = self._keepalive_deadline()
        if keepalive is not None and now >= keepalive:
            if self._keepalive_probes >= self.config.keepalive_count:
                self._emit(ev.ConnectionTimedOut())
                self._enter_closed()
                return
            self._keepalive_probes += 1
            self._control.append(self._segment(self._snd_una - 1, ACK, now=now))

    def _on_rto(self, now: float) -> None:
        state = self.state
        if state in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            if self._syn_retries_left <= 0:
                self._emit(ev.ConnectionTimedOut())
                self._enter_closed()
                return
            self._syn_retries_left -= 1
            self._rto = min(self.config.max_rto, self._rto * 2)
            self._rtt_seq = None  # Karn: never time a retransmitted SYN
            self._rto_deadline = None
            self._syn_due = True
            return
        if self._snd_una >= self._snd_max:
            self._rto_deadline = None
            return
        self._retries += 1
        self.stats_rto += 1
        self._tlp_out = False
        if self._retries > self.config.max_retries:
            self._emit(ev.ConnectionTimedOut())
            self._enter_closed()
            return
        mss = self._send_mss()
        # No undo after an RTO: the response would have to keep the SACK scoreboard
        # (Linux's F-RTO does); go-back-N is the safe answer here.
        self._undo_pending = False
        if self._retries == 1:
            self._ssthresh = self._reduced_window()
        self._cwnd = mss
        self._in_recovery = False
        self._dupacks = 0
        self._sacked = []
        self._rexmit_high = self._snd_max  # go-back-N re-sends all of it
        self._loss_recover = self._snd_max
        self._snd_nxt = self._snd_una
        self._high_rxt = self._snd_una
        self._rtt_seq = None
        self._rto = min(self.config.max_rto, self._rto * 2)
        self._rto_deadline = now + self._rto

    # ------------------------------------------------------------------ output

    def segments_to_send(self, now: float) -> list[TcpSegment]:
        """Every segment that should go out now (control, data, then a pure ACK)."""
        out = self._control
        self._control = []
        state = self.state
        if state is TcpState.CLOSED:
            return out
        if state is TcpState.SYN_SENT or state is TcpState.SYN_RECEIVED:
            if self._syn_due or self._snd_max == 0:
                self._syn_due = False
                out.append(self._syn_segment(now))
                if self._snd_max == 0:
                    self._rtt_seq = 0
                    self._rtt_time = now
                self._snd_nxt = self._snd_max = 1
                self._rto_deadline = now + self._rto
            if state is TcpState.SYN_SENT:
                return out
        elif state in _SEND_STATES:
            self._transmit(now, out)
        if self._ack_now:
            # SEQ of a pure ACK is the highest sent, as Linux's tcp_acceptable_seq():
            # after an RTO SND.NXT went back, and the peer would find it too old.
            out.append(self._segment(self._snd_max, ACK, now=now))
        self._ack_now = False
        return out

    def _pipe(self) -> int:
        """Bytes believed in the network (RFC 6675 section 4, simplified)."""
        nxt = self._snd_nxt
        outstanding = nxt - self._snd_una
        if self._sacked:
            sacked = 0
            lost = 0
            cursor = self._snd_una
            rxt = self._high_rxt
            for s, e in self._sacked:
                if s >= nxt:
                    break  # after an RTO only what was re-sent counts (go-back-N)
                e = min(e, nxt)
                sacked += e - s
                if self._in_recovery and s > cursor:
                    hole_start = max(cursor, rxt)
                    if s > hole_start:
                        lost += s - hole_start
                cursor = e
            return max(0, outstanding - sacked - lost)
        pipe = outstanding - min(self._dupacks, 1000) * self._send_mss()
        if self._in_recovery and self._high_rxt <= self._snd_una:
            pipe -= self._send_mss()
        return max(0, pipe)

    def _next_hole(self, mss: int) -> tuple[int, int] | None:
        """The next lost range to retransmit in recovery (RFC 6675 NextSeg rule 1)."""
        start = max(self._high_rxt, self._snd_una)
        sacked = self._sacked
        if not sacked:
            if start == self._snd_una and start < self._snd_max:
                return start, min(self._snd_max, start + mss)
            return None
        index = bisect.bisect_right(sacked, (start, _INFINITY))  # first range above start
        if index > 0 and start < sacked[index - 1][1]:
            start = sacked[index - 1][1]  # inside a SACKed range: skip past it
        if index >= len(sacked):
            return None  # nothing SACKed above: not known lost (RFC 6675 IsLost)
        return start, min(sacked[index][0], start + mss)

    def _transmit(self, now: float, out: list[TcpSegment]) -> None:
        mss = self._data_mss()
        sent = 0
        data_end = self._sndbuf_start + len(self._sndbuf)
        fin = self._fin_offset
        # The pipe is computed once, then grows by what each segment adds: new data
        # grows the outstanding bytes, a retransmitted hole stops counting as lost.
        pipe = self._pipe()
        template: TcpSegment | None = None  # the first data segment sent by this call
        while sent < _MAX_SEGMENTS_PER_CALL:
            room = self._cwnd - pipe
            if self._tlp_new_data:
                room = max(room, mss)
            if room <= 0:
                break
            if self._in_recovery:
                hole = self._next_hole(mss)
                if hole is not None:
                    start, end = hole
                    end = min(end, data_end)
                    if end > start:
                        out.append(self._data_segment(start, end, now, fin))
                        self._high_rxt = end
                        pipe += end - start
                        sent += 1
                        continue
                    if fin is not None and start == fin:
                        out.append(self._segment(fin, FIN | ACK, now=now))
                        self._high_rxt = fin + 1
                        pipe += 1
                        sent += 1
                        continue
            nxt = self._snd_nxt
            if nxt < self._snd_max and self._sacked:
                for s, e in self._sacked:  # go-back-N skips what the peer SACKed
                    if s <= nxt < e:
                        nxt = self._snd_nxt = min(e, data_end)
                        break
            wnd_right = self._snd_una + self._snd_wnd
            usable = min(wnd_right - nxt, room)
            avail = data_end - nxt
            if avail > 0:
                length = min(avail, mss, usable)
                if length <= 0:
                    self._arm_persist(now)
                    break
                # Sender SWS avoidance (RFC 9293 3.8.6.2.1): no runts mid-stream,
                # unless that is at least half the largest window the peer offered.
                if (
                    length < mss
                    and length < avail
                    and (room < mss or length < self._max_snd_wnd // 2)
                ):
                    if self._snd_una == self._snd_max:
                        self._arm_persist(now)
                    break
                end = nxt + length
                if template is not None and nxt >= self._snd_max and end != fin:
                    # New data after the first segment of this call: the ACK fields
                    # (ack, window, timestamps, SACK) are the first's, so only the
                    # payload and the sequence number change.
                    flags = ACK | PSH if end == data_end else ACK
                    out.append(
                        TcpSegment(
                            template.src_port,
                            template.dst_port,
                            (self._iss + nxt) & MASK32,
                            template.ack,
                            flags,
                            template.window,
                            self._sndbuf.peek(nxt - self._sndbuf_start, length),
                            None,
                            None,
                            False,
                            template.timestamp,
                            template.sack_blocks,
                        )
                    )
                    self._snd_nxt = end
                    self._ack_now = False  # as _segment: new data carries our ACK
                    self._ack_pending = 0
                    self._ack_deadline = None
                else:
                    segment = self._data_segment(nxt, end, now, fin)
                    out.append(segment)
                    if segment.flags & ACK:
                        template = segment
                self._tlp_new_data = False
                pipe += length
                self._persist_deadline = None
                self._persist_backoff = 0
            elif fin is not None and nxt == fin:
                out.append(self._segment(fin, FIN | ACK, now=now))
                self._snd_nxt = fin + 1
                pipe += 1
            else:
                break
            sent += 1
            if self._snd_nxt > self._snd_max:
                if self._rtt_seq is None and not self._ts_ok:
                    self._rtt_seq = self._snd_max
                    self._rtt_time = now
                self._snd_max = self._snd_nxt
            if self._rto_deadline is None:
                self._rto_deadline = now + self._rto
        self._tlp_new_data = False
        if sent and self._tlp_deadline is None:
            self._arm_tail_loss_probe(now)

    def _arm_tail_loss_probe(self, now: float) -> None:
        """PTO per RFC 8985 section 7.2: 2 SRTT, plus the peer's worst delayed ACK when
        a single segment is in flight, and never beyond the RTO."""
        self._tlp_deadline = None
        srtt = self._srtt
        if (
            not self.config.tail_loss_probe
            or srtt is None
            or self._tlp_out
            or self._in_recovery
            or self._snd_una >= self._snd_max
            or self._snd_nxt < self._snd_max
        ):
            return
        pto = 2 * srtt
        if self._snd_max - self._snd_una <= self._data_mss():
            pto = max(pto, 1.5 * srtt + 0.2)
        deadline = now + max(pto, 0.01)
        if self._rto_deadline is None or deadline < self._rto_deadline:
            self._tlp_deadline = deadline

    def _send_tail_loss_probe(self, now: float) -> None:
        """RFC 8985 section 7.3: new data if the window allows, else the last segment."""
        if (
            self.state not in _SEND_STATES
            or self._in_recovery
            or self._snd_una >= self._snd_max
            or self._snd_nxt < self._snd_max
        ):
            return
        self._tlp_out = True
        self.stats_tlp += 1
        data_end = self._sndbuf_start + len(self._sndbuf)
        if self._snd_nxt < data_end and self._snd_una + self._snd_wnd > self._snd_nxt:
            self._tlp_new_data = True  # _transmit sends one segment beyond cwnd
        else:
            end = min(self._snd_max, data_end)
            start = max(self._snd_una, end - self._data_mss())
            if end > start:
                self._control.append(self._data_segment(start, end, now, self._fin_offset))
            elif self._fin_offset is not None and self._snd_max > self._fin_offset:
                self._control.append(self._segment(self._fin_offset, FIN | ACK, now=now))
        self._rto_deadline = now + self._rto

    def _arm_persist(self, now: float) -> None:
        if self._snd_una == self._snd_max and self._persist_deadline is None:
            self._persist_deadline = now + max(self._rto, self.config.min_rto)

    def _data_segment(self, start: int, end: int, now: float, fin: int | None) -> TcpSegment:
        offset = start - self._sndbuf_start
        payload = self._sndbuf.peek(offset, end - start)
        flags = ACK
        if end == self._sndbuf_start + len(self._sndbuf):
            flags |= PSH
            if fin is not None and end == fin:
                flags |= FIN
        if start < self._snd_max:
            self.stats_retransmitted += 1
            if end > self._rexmit_high:
                self._rexmit_high = end
            if self._undo_pending and self._undo_tsval is None:
                self._undo_tsval = self._ts_now(now)
        if start >= self._snd_nxt or self._snd_nxt < end:
            self._snd_nxt = end + (1 if flags & FIN else 0)
        return self._segment(start, flags, payload, now)
