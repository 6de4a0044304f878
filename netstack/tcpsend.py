"""The send side of a TCP connection (see ``tcp.py`` for the theory of operation): ACK
processing, RTT and RTO, congestion control and loss recovery (SACK scoreboard, fast
retransmit, reordering, undo, tail loss probes), and transmission."""

from __future__ import annotations

import bisect

from netstack import events as ev
from netstack import speedups
from netstack.bbr import PACING_SLICE, Bbr
from netstack.rack import covered, newer, rate_sample, subtract
from netstack.tcpbase import (
    _INFINITY,
    _MAX_REORDERING,
    _MAX_SACK_RANGES,
    _MAX_SEGMENTS_PER_CALL,
    _SEND_STATES,
    MASK32,
    TcpBase,
    TcpState,
    _unwrap,
    merge_ranges,
)
from netstack.tcpwire import ACK, FIN, PSH, RST, TcpSegment

# Runs of new full-size data segments in ``_transmit`` (Cython or its twin).  Looked up
# at each call: tests swap it out for the general loop alone.
send_run = speedups.tcp_send_run


class SendSide(TcpBase):
    """Send-side methods of ``TcpConnection``."""

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
        una_before = self._snd_una
        rack = self._sack_ok and self.config.rack
        sacked_before = self._sacked
        new_sack = (
            bool(seg.sack_blocks)
            and self._sack_ok
            and self._update_scoreboard(seg.sack_blocks, now)
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
        if rack and (new_sack or (ack > una_before and (sacked_before or self._in_recovery))):
            self._rack_on_ack(una_before, ack, sacked_before, seg, now)
            if self._in_recovery and not self._cc_model:
                delivered = (self._snd_una - una_before) + (
                    covered(self._sacked) - covered(sacked_before)
                )
                self._prr_on_ack(delivered)
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
        # Comparisons rather than max()/min(): the same values, on every ACK's path.
        if rtt < 0.0:
            rtt = 0.0
        srtt = self._srtt
        if srtt is None:
            srtt = self._srtt = rtt
            rttvar = self._rttvar = rtt / 2
        else:
            rttvar = self._rttvar = 0.75 * self._rttvar + 0.25 * abs(srtt - rtt)
            srtt = self._srtt = 0.875 * srtt + 0.125 * rtt
        spread = 4 * rttvar
        rto = srtt + (spread if spread > 0.001 else 0.001)
        config = self.config
        if not rto > config.min_rto:
            rto = config.min_rto
        self._rto = rto if rto < config.max_rto else config.max_rto

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
            self._note_reordering(max(self._dupacks, (fack - self._snd_una) // self._snd_mss))
        self._snd_una = ack
        if self._snd_nxt < ack:
            self._snd_nxt = ack
        if self._high_rxt < ack:
            self._high_rxt = ack
        if self._sacked:
            self._sacked = [(max(s, ack), e) for s, e in self._sacked if e > ack]
        if self._lost:
            self._lost = [(max(s, ack), e) for s, e in self._lost if e > ack]
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
        mss = self._snd_mss
        if self._undo_pending and ack > self._undo_seq:
            self._check_spurious(seg, now)
        if self._in_recovery:
            if ack >= self._recover:  # full ACK: leave recovery (RFC 6582 section 3.2 step 3)
                self._in_recovery = False
                self._dupacks = 0
                self._lost = []
                self._rack.on_recovery_done()
                if not self._cc_model:  # RFC 6937: cwnd = ssthresh on leaving
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
        if self._in_recovery or (self._sack_ok and self.config.rack):
            return  # with SACK, RACK decides what is lost (_rack_on_ack)
        mss = self._snd_mss
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

    def _arm_undo(self, rto: bool = False) -> None:
        self._undo_pending = self._ts_ok
        self._undo_rto = rto
        self._undo_cwnd = self._cwnd
        self._undo_ssthresh = self._ssthresh
        self._undo_cc = self._cc.snapshot()
        self._undo_seq = self._snd_una
        self._undo_tsval = None

    def _check_spurious(self, seg: TcpSegment, now: float) -> None:
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
        if not self._cc_model:
            self._ssthresh = max(self._ssthresh, self._undo_ssthresh)
        self._cc.restore(self._undo_cc)
        self._rack.on_spurious(now, self._srtt or 0.0)
        if self._undo_rto:
            # A spurious RTO (RFC 5682's question answered by RFC 3522's timestamps):
            # the originals arrived, only delayed.  Go-back-N stops: what was not
            # re-sent yet is not re-sent, and new data follows (RFC 4015's response).
            self._undo_rto = False
            self.stats_spurious_rto += 1
            if self._snd_nxt < self._snd_max:
                self._snd_nxt = self._snd_max
            self._loss_recover = self._snd_una
            self._rexmit_high = self._snd_una
            return
        self._note_reordering(self._undo_degree)
        if self._in_recovery:
            self._in_recovery = False
            self._dupacks = 0
            self._lost = []

    def _enter_recovery(self) -> None:
        """Fast retransmit (RFC 5681 section 3.2; RFC 6675 section 5)."""
        self._arm_undo()
        self._in_recovery = True
        self.stats_recoveries += 1
        self._recover = self._snd_max
        self._high_rxt = self._snd_una
        if self._cc_model:
            return  # the model's window and pacing rate carry on (BBR v1)
        self._ssthresh = self._reduced_window()
        if self._sack_ok and self.config.rack:
            # PRR (RFC 6937 section 3): the window follows what the ACKs deliver from
            # here, towards ssthresh (_prr_on_ack, run for this ACK too).
            self._prr_delivered = 0
            self._prr_out = 0
            self._recover_fs = max(self._snd_max - self._snd_una, 1)
            self._prr_on_ack(0)  # the window now (entered by an ACK or RACK's timer)
        else:
            self._cwnd = self._ssthresh

    def _reduced_window(self) -> int:
        """ssthresh after a loss, from the congestion controller.

        FlightSize can exceed cwnd right after recovery (everything sent but lost is
        still outstanding), so the controllers cap it by cwnd, as Linux does.
        """
        flight = self._snd_max - self._snd_una
        if self._sack_ok and self.config.rack:
            # RACK may see a loss on the ACK that also acknowledged most of the window
            # (one ACK for a burst that arrived together): FlightSize is then far below
            # what was in flight when the loss happened.  Linux's ssthresh hooks take
            # cwnd alone, which the cwnd-limited growth rule keeps honest.
            flight = max(flight, self._cwnd)
        return self._cc.on_loss(self._cwnd, flight, self._snd_mss)

    def _update_scoreboard(self, blocks: tuple[tuple[int, int], ...], now: float) -> bool:
        ranges = self._sacked
        fack = ranges[-1][1] if ranges else 0  # the highest SACKed byte so far
        added: list[tuple[int, int]] = []
        for index, (left_wire, right_wire) in enumerate(blocks):
            left = _unwrap(left_wire, self._iss, self._snd_una)
            right = _unwrap(right_wire, self._iss, self._snd_una)
            dsack = index == 0 and left < right and right <= self._snd_una
            if index == 0 and not dsack and left < right and len(blocks) > 1:
                outer_left = _unwrap(blocks[1][0], self._iss, self._snd_una)
                outer_right = _unwrap(blocks[1][1], self._iss, self._snd_una)
                dsack = outer_left <= left and right <= outer_right
            if dsack:
                # A D-SACK (RFC 2883 section 4): data that arrived twice, so a
                # retransmission was not needed.  RACK widens its reordering window.
                self.stats_dsack += 1
                self._rack.on_spurious(now, self._srtt or 0.0)
                continue
            left = max(left, self._snd_una)
            if right <= left or right > self._snd_max:
                continue  # bogus
            if not any(s <= left and right <= e for s, e in ranges):
                if right <= fack and left >= self._rexmit_high:
                    # Newly SACKed below the highest SACK and never re-sent: reordered.
                    self._note_reordering((fack - left) // self._snd_mss + 1)
                added.append((left, right))
        if not added:
            return False
        self._newly_sacked = added
        # The lowest ranges matter most.
        self._sacked = merge_ranges(ranges + added)[:_MAX_SACK_RANGES]
        if self._lost:  # SACKed after all: not lost (not re-sent yet either)
            self._lost = [p for s, e in self._lost for p in subtract(s, e, self._sacked)]
        return True

    # ---------------------------------------------------------------- RACK-TLP, PRR

    def _echoed_is_older(self, sent_at: float) -> bool:
        """Does the ACK being processed echo a TSval older than one sent at
        ``sent_at``?  (Then it acknowledges an earlier transmission.)"""
        tsecr = self._ack_tsecr
        if tsecr is None:
            return False
        return 0 < (self._ts_now(sent_at) - tsecr) & MASK32 < 0x80000000

    def _rack_on_ack(
        self,
        una_before: int,
        ack: int,
        sacked_before: list[tuple[int, int]],
        seg: TcpSegment,
        now: float,
    ) -> None:
        """RFC 8985 section 6.2 for one ACK: RACK's state from the newly delivered
        bytes, then loss detection (which may start recovery)."""
        delivered = [
            (s, e, True)
            for s, e in (subtract(una_before, ack, sacked_before) if ack > una_before else ())
        ]
        for start, end in self._newly_sacked:
            delivered.extend((s, e, False) for s, e in subtract(start, end, sacked_before))
        self._newly_sacked = []
        ts = seg.timestamp
        self._ack_tsecr = ts[1] if self._ts_ok and ts is not None and ts[1] else None
        self._rack.update(
            self._sent_log, delivered, now, self._rack_min_rtt(), self._echoed_is_older
        )
        self._ack_tsecr = None
        self._rack_detect(now)

    def _rack_min_rtt(self) -> float:
        return self._min_rtt if self._min_rtt < _INFINITY else (self._srtt or 0.0)

    def _rack_detect(self, now: float) -> None:
        """RACK_detect_loss_and_arm_timer (RFC 8985 6.2 step 5 and 6.3)."""
        self._rack_deadline = None
        if self._snd_nxt < self._snd_max or self._snd_una < self._loss_recover:
            return  # after an RTO go-back-N re-sends everything (the Loss state)
        min_rtt = self._rack_min_rtt()
        reo_wnd = self._rack.reo_wnd(
            self._in_recovery,
            covered(self._sacked) // self._snd_mss,
            min_rtt,
            self._srtt or min_rtt,
        )
        newly, wake = self._rack.detect_loss(
            self._sent_log, self._snd_una, self._sacked, self._lost, reo_wnd, now
        )
        self._rack_deadline = wake
        if not newly:
            return
        self._lost = merge_ranges(self._lost + newly)
        if not self._in_recovery:
            mss = self._snd_mss
            outstanding = -(-(self._snd_max - self._snd_una) // mss)
            self._undo_degree = min(covered(self._sacked) // mss + 1, outstanding)
            self._enter_recovery()

    def _prr_on_ack(self, delivered: int) -> None:
        """RFC 6937 section 3: the window in recovery.  While more than ssthresh is in
        flight, send in proportion to what was delivered (ssthresh / RecoverFS of it);
        below, grow back towards ssthresh no faster than slow start would (PRR-SSRB)."""
        self._prr_delivered += delivered
        pipe = self._pipe()
        ssthresh = self._ssthresh
        if pipe > ssthresh:
            sndcnt = -(-self._prr_delivered * ssthresh // self._recover_fs) - self._prr_out
        else:
            limit = max(self._prr_delivered - self._prr_out, delivered) + self._snd_mss
            sndcnt = min(ssthresh - pipe, limit)
        if not self._prr_out and sndcnt < self._snd_mss:
            sndcnt = self._snd_mss  # the fast retransmit itself always goes (as Linux)
        self._cwnd = pipe + max(sndcnt, 0)

    def _note_retransmission(self, start: int, end: int, now: float) -> None:
        """``[start, end)`` is being sent again: RACK times it from now, and it is no
        longer waiting in the lost ranges."""
        self._sent_log.record(
            start,
            end,
            now,
            retransmitted=True,
            delivered=self._delivered,
            delivered_time=self._delivered_time,
            app_limited=False,
            first_sent=self._first_sent,
        )
        if self._lost:
            self._lost = [p for s, e in self._lost for p in subtract(s, e, [(start, end)])]

    def _retire_sent(self, now: float) -> None:
        """Runs acknowledged since the last look leave the send log; a model-based
        controller learns from their delivery-rate sample."""
        delivered = self._snd_una + (covered(self._sacked) if self._sacked else 0)
        acked = delivered - self._delivered
        if acked:
            self._delivered = delivered
            self._delivered_time = now
            if self._app_limited and delivered > self._app_limited:
                self._app_limited = 0
        run = self._sent_log.retire(self._snd_una)
        rack = self._rack
        if rack.sample_run is not None:
            if run is None or newer(rack.sample_run, run):
                run = rack.sample_run
            rack.sample_run = None
        if run is None and not acked:
            return  # nothing delivered since the last look (the controller runs on ACKs)
        sample = None
        if run is not None:
            if run.time > self._first_sent:
                self._first_sent = run.time
            if not run.retransmitted and 0 < now - run.time < self._min_rtt:
                self._min_rtt = now - run.time
            sample = rate_sample(run, delivered, now, self._rack_min_rtt())
        cc = self._cc
        if self._cc_model and isinstance(cc, Bbr):
            cc.on_sample(sample, now, self._pipe(), self._snd_mss, self._cwnd, self._srtt)
            marked = rack.stats_marked
            lost, self._marked_seen = marked - self._marked_seen, marked
            self._cwnd = cc.set_window(
                self._cwnd,
                max(acked, 0),
                lost,
                delivered,
                self._in_recovery or self._snd_una < self._loss_recover,
            )
            self._pace_rate = cc.pacing_rate
        elif self._pacing and self._srtt:
            # Linux's tcp_update_pacing_rate: twice cwnd per RTT in slow start, 1.2x after.
            ratio = 2.0 if self._cwnd < self._ssthresh // 2 else 1.2
            self._pace_rate = ratio * self._cwnd / max(self._srtt, 1e-4)

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
        mss = self._snd_mss
        if self._retries == 1:
            # Was it spurious (a delay spike, not a loss)?  The first ACK past SND.UNA
            # tells, by the timestamp it echoes (RFC 3522 detection for RFC 5682's
            # question): _check_spurious undoes all of this then.  Later RTOs of the
            # same episode keep the first one's saved state.
            self._arm_undo(rto=True)
            if not self._cc_model:
                self._ssthresh = self._reduced_window()
            elif isinstance(self._cc, Bbr):
                self._cc.enter_loss(self._cwnd)
        else:
            self._undo_pending = False
        self._cwnd = mss
        self._in_recovery = False
        self._dupacks = 0
        # The SACK scoreboard stays (as Linux's tcp_timeout_mark_lost): go-back-N below
        # skips what the peer holds; everything else is re-sent.
        self._lost = []
        self._rack_deadline = None
        self._rexmit_high = self._snd_max  # go-back-N re-sends all of it
        self._loss_recover = self._snd_max
        self._snd_nxt = self._snd_una
        self._high_rxt = self._snd_una
        self._rtt_seq = None
        self._rto = min(self.config.max_rto, self._rto * 2)
        self._rto_deadline = now + self._rto

    def _pipe(self) -> int:
        """Bytes believed in the network (RFC 6675 section 4, simplified)."""
        nxt = self._snd_nxt
        outstanding = nxt - self._snd_una
        if not self._dupacks and not self._in_recovery and not self._sacked:
            return outstanding if outstanding > 0 else 0  # all of it (the common case)
        if self._sacked or self._lost:
            sacked = 0
            lost = 0
            cursor = self._snd_una
            rxt = self._high_rxt
            rack = self._sack_ok and self.config.rack
            for s, e in self._sacked:
                if s >= nxt:
                    break  # after an RTO only what was re-sent counts (go-back-N)
                e = min(e, nxt)
                sacked += e - s
                if not rack and self._in_recovery and s > cursor:
                    hole_start = max(cursor, rxt)
                    if s > hole_start:
                        lost += s - hole_start
                cursor = e
            if rack:  # what RACK marked lost and was not re-sent yet
                for s, e in self._lost:
                    if s >= nxt:
                        break
                    lost += min(e, nxt) - s
            return max(0, outstanding - sacked - lost)
        pipe = outstanding - min(self._dupacks, 1000) * self._snd_mss
        if self._in_recovery and self._high_rxt <= self._snd_una:
            pipe -= self._snd_mss
        return max(0, pipe)

    def _next_hole(self, mss: int) -> tuple[int, int] | None:
        """The next lost range to retransmit in recovery (RFC 6675 NextSeg rule 1)."""
        if self._sack_ok and self.config.rack:
            lost = self._lost  # RACK's marks (RFC 8985), in sequence order
            if not lost:
                return None
            start, end = lost[0]
            return start, min(end, start + mss)
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

    def _transmit(
        self,
        now: float,
        out: list[TcpSegment | bytes],
        wire: tuple[bytes, bytes] | None = None,
    ) -> None:
        """Send what the windows allow (see ``tcp.py``), into ``out``; with ``wire``
        (the addresses) the runs of bulk data arrive there already as IP packets."""
        log = self._sent_log.runs
        if log and (log[0].end <= self._snd_una or self._cc_model):
            self._retire_sent(now)  # acknowledged runs leave the send log (RACK, BBR)
        data_end = self._sndbuf_start + len(self._sndbuf)
        fin = self._fin_offset
        if self._snd_nxt >= data_end and self._snd_nxt != fin and not self._in_recovery:
            # Nothing new, no FIN, no hole: what the loop below would find at once
            # (a receiver's every ACK comes by here).
            self._tlp_new_data = False
            return
        mss = self._data_mss() if self._ooo_ranges else self._snd_data_mss
        sent = 0
        # The pipe is computed once, then grows by what each segment adds: new data
        # grows the outstanding bytes, a retransmitted hole stops counting as lost.
        pipe = self._pipe()
        pipe_before = pipe
        max_before = self._snd_max
        limit = _MAX_SEGMENTS_PER_CALL
        budget = -1.0  # bytes the pacing slice allows (negative: not paced)
        rate = self._pace_rate
        if self._pacing and rate > 0 and not self._tlp_new_data:
            # Pacing by time slices (no timer per segment): the budget refills at the
            # pacing rate and holds at most two slices, one millisecond: uvloop's
            # timers fire on millisecond ticks, and a smaller budget would cap the
            # rate of a timer-driven sender below the pacing rate.  While it is short
            # of a slice's worth nothing goes out and the deadline wakes the sender.
            quantum = max(2.0 * mss, rate * PACING_SLICE)
            tokens = self._pace_tokens + (now - self._pace_time) * rate
            if tokens > 2 * quantum:
                tokens = 2 * quantum
            self._pace_tokens = tokens
            self._pace_time = now
            self._pace_deadline = None
            if tokens < mss:
                if self._cwnd - pipe >= mss:
                    self._pace_deadline = now + (quantum - tokens) / rate
                    self.stats_paced += 1
                return
            budget = tokens
            limit = int(tokens // mss) + 1
        template: TcpSegment | None = None  # the first data segment sent by this call
        while sent < limit:
            if template is not None and not self._in_recovery:
                nxt = self._snd_nxt
                if nxt >= data_end and nxt != fin and nxt >= self._snd_max:
                    # All sent (a request or response: one segment) -- what the send
                    # run and the checks below would find, without their work.
                    break
                # The bulk of a sender's segments: the template branch below, many
                # in a row (Cython or its twin); whatever it leaves comes back here.
                count, pipe = send_run(
                    self,
                    template,
                    out,
                    pipe,
                    data_end,
                    fin,
                    mss,
                    limit - sent,
                    now,
                    wire,
                )
                sent += count
                if sent >= limit:
                    break
            room = self._cwnd - pipe
            if self._tlp_new_data:
                room = max(room, mss)
            if room <= 0:
                break
            if budget >= 0 and pipe - pipe_before >= budget:
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
                        self._note_retransmission(fin, fin + 1, now)
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
                    # payload and the sequence number change.  ``send_run`` above
                    # takes every such segment; this is its definition, which the
                    # tests run with the send run switched off.
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
        if self._snd_nxt >= data_end and self._cwnd - pipe >= mss and not self._app_limited:
            # The application, not the network, limits us: delivery-rate samples until
            # this is delivered say so (BBR does not take them for the path's rate).
            self._app_limited = max(self._delivered + pipe, 1)
        if self._snd_max > max_before:  # new data: one run of the send log
            if not pipe_before:  # nothing was in flight: the intervals start afresh
                self._first_sent = self._delivered_time = now
            self._sent_log.record(
                max_before,
                self._snd_max,
                now,
                retransmitted=False,
                delivered=self._delivered,
                delivered_time=self._delivered_time,
                app_limited=self._app_limited > 0,
                first_sent=self._first_sent,
            )
        if budget >= 0:
            spent = pipe - pipe_before
            self._pace_tokens -= spent
            if sent >= limit or (spent >= budget and self._cwnd - pipe >= mss):
                tokens = self._pace_tokens
                quantum = max(2.0 * mss, rate * PACING_SLICE)
                self._pace_deadline = now + max(quantum - tokens, mss) / rate
                self.stats_paced += 1
        if self._in_recovery:
            self._prr_out += pipe - pipe_before
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
            pto += self.config.tlp_max_ack_delay  # the peer may delay its one ACK
        deadline = now + (0.01 if pto < 0.01 else pto)
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
            self._note_retransmission(start, min(end, self._snd_max), now)
            if end > self._rexmit_high:
                self._rexmit_high = end
            if self._undo_pending and self._undo_tsval is None and start <= self._undo_seq < end:
                # Eifel times the retransmission of the segment at SND.UNA when the
                # episode began: its ACK tells which transmission arrived first.
                self._undo_tsval = self._ts_now(now)
        if start >= self._snd_nxt or self._snd_nxt < end:
            self._snd_nxt = end + (1 if flags & FIN else 0)
        return self._segment(start, flags, payload, now)
