"""The TCP connection state machine, sans-IO (RFC 9293 and what Linux expects of a peer).

Theory of operation
-------------------
A ``TcpConnection`` is fed ``receive(segment, now)`` and ``handle_timer(now)``; the
application calls ``send()``, ``read()``, ``close()`` (half-close: FIN after the queued
bytes) and ``abort()`` (RST).  Output is pulled with ``segments_to_send(now)``, events
with ``events()``, and the single timer with ``next_deadline()``.  It never reads a
clock or a random source: ISN and timestamp offset are given by the caller (RFC 9293
section 3.4.1; RFC 7323 section 5.4).

The class is put together from parts: ``tcpbase.py`` (states, tunables, the fields),
``tcpsend.py`` (the send side below), ``tcprecv.py`` (the receive side below); this
module keeps opening and closing, the application calls, segment dispatch in
``receive`` and the timers.

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
exactly what the general path below would and declines anything else untouched; the
Stack runs the same path straight from its packet loop (``speedups.tcp_receive_run``)
and hands what it declines to ``_receive_general``.  On the send side
``speedups.tcp_send_run`` emits ``_transmit``'s runs of new full-size segments, as IP
packets when the Stack asks through ``packets_to_send``.
``tests/netstack/test_established_path.py`` holds each to the general path, packet for
packet.

Robustness: PAWS (RFC 7323 section 5), RST and SYN validation with challenge ACKs and
ACK-range checks (RFC 5961 sections 3-5), TIME_WAIT of ``config.time_wait`` seconds
(RFC 9293 3.6.1) which a newer SYN may end (RFC 6191, see ``accepts_new_syn``),
optional keepalive (RFC 9293 3.8.4).
"""

from __future__ import annotations

from netstack import events as ev
from netstack import speedups
from netstack.speedups import build_tcp_packet
from netstack.tcpbase import (
    _APP_SEND_STATES,
    _PERSIST_MAX,
    _RECEIVE_DATA_STATES,
    _SEND_STATES,
    FAST_STATES,
    MASK32,
    TcpConfig,
    TcpState,
    TcpStateError,
    _unwrap,
)
from netstack.tcprecv import ReceiveSide
from netstack.tcpsend import SendSide
from netstack.tcpwire import ACK, FIN, RST, SYN, TcpSegment

__all__ = ["FAST_STATES", "TcpConfig", "TcpConnection", "TcpState", "TcpStateError"]

# Members as module constants: ``TcpState.CLOSED`` costs an Enum class attribute
# lookup (~0.1 us) on every output call.
_CLOSED = TcpState.CLOSED
_SYN_SENT = TcpState.SYN_SENT
_SYN_RECEIVED = TcpState.SYN_RECEIVED

# In-order, ACK-only segments once established (Cython or its twin).  Looked up at each
# call: tests swap it out.
receive_established = speedups.tcp_receive_established


class TcpConnection(SendSide, ReceiveSide):
    """One TCP connection's state machine; see the module docstring."""

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
        self._fix_mss()
        if syn.timestamp is not None:
            self._ts_recent = syn.timestamp[0]
        self._snd_wnd = syn.window  # never scaled in a SYN (RFC 7323 section 2.2)
        self._max_snd_wnd = self._snd_wnd
        self._cwnd = self.config.initial_window_segments * self._snd_mss

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
        return self.state is _CLOSED

    def events(self) -> list[ev.TcpEvent]:
        """Events since the last call, oldest first."""
        out, self._events = self._events, []
        return out

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
            timestamp = ((int(now * 1000) + self._ts_offset) & MASK32, self._ts_recent)  # _ts_now
        ack = 0
        window = 0
        sack: tuple[tuple[int, int], ...] = ()
        if flags & ACK:
            rcv_nxt = self._rcv_nxt
            ack = (self._irs + rcv_nxt) & MASK32
            window = self._advertise()
            if self._ooo_ranges:
                sack = self._sack_blocks()
            self._last_ack_sent = rcv_nxt
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
            None,
            None,
            False,
            timestamp,
            sack,
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

    def receive(self, seg: TcpSegment, now: float) -> None:
        """Process one segment addressed to this connection (RFC 9293 3.10.7)."""
        if self.state in FAST_STATES and receive_established(self, seg, now):
            return  # the common in-order segment, handled by the hot path
        self._receive_general(seg, now)

    def _receive_general(self, seg: TcpSegment, now: float) -> None:
        """``receive`` past the hot path (the Stack calls it directly when its packet
        path already offered the segment to the hot path)."""
        state = self.state
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

    def next_deadline(self) -> float | None:
        """The earliest time ``handle_timer`` must be called, or None."""
        best = self._rto_deadline
        for deadline in (
            self._tlp_deadline,
            self._rack_deadline,
            self._pace_deadline,
            self._ack_deadline,
            self._persist_deadline,
            self._time_wait_deadline,
        ):
            if deadline is not None and (best is None or deadline < best):
                best = deadline
        if self.config.keepalive_idle is not None:
            deadline = self._keepalive_deadline()
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
        if self._rack_deadline is not None and now >= self._rack_deadline:
            self._rack_deadline = None  # RACK's reorder timer (RFC 8985 section 6.3)
            if self.state in _SEND_STATES:
                self._rack_detect(now)
        if self._tlp_deadline is not None and now >= self._tlp_deadline:
            self._tlp_deadline = None
            self._send_tail_loss_probe(now)
        if self._pace_deadline is not None and now >= self._pace_deadline:
            self._pace_deadline = None  # the next pacing slice: _transmit sends it
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

    def segments_to_send(self, now: float) -> list[TcpSegment]:
        """Every segment that should go out now (control, data, then a pure ACK)."""
        return self._output(now, None)  # type: ignore[return-value]  # no wire: segments

    def packets_to_send(self, now: float, local: bytes, remote: bytes) -> list[bytes]:
        """``segments_to_send`` as the IP packets carrying them from ``local`` to
        ``remote`` (packed addresses); runs of bulk data are built straight into
        packets, never made segments first."""
        out = self._output(now, (local, remote))
        for index, item in enumerate(out):
            if type(item) is not bytes:
                out[index] = build_tcp_packet(item, local, remote)
        return out  # type: ignore[return-value]  # every item is a packet now

    def _output(self, now: float, wire: tuple[bytes, bytes] | None) -> list[TcpSegment | bytes]:
        out: list[TcpSegment | bytes] = self._control  # type: ignore[assignment]
        self._control = []
        state = self.state
        if state in _SEND_STATES:  # the common case first (the states are disjoint)
            self._transmit(now, out, wire)
        elif state is _CLOSED:
            return out
        elif state is _SYN_SENT or state is _SYN_RECEIVED:
            if self._syn_due or self._snd_max == 0:
                self._syn_due = False
                out.append(self._syn_segment(now))
                if self._snd_max == 0:
                    self._rtt_seq = 0
                    self._rtt_time = now
                self._snd_nxt = self._snd_max = 1
                self._rto_deadline = now + self._rto
            if state is _SYN_SENT:
                return out
        if self._ack_now:
            # SEQ of a pure ACK is the highest sent, as Linux's tcp_acceptable_seq():
            # after an RTO SND.NXT went back, and the peer would find it too old.
            out.append(self._segment(self._snd_max, ACK, now=now))
        self._ack_now = False
        return out
