"""The send side of a TCP connection (see ``tcp.py`` for the theory of operation): ACK
processing, RTT and RTO, congestion control and loss recovery (SACK scoreboard, fast
retransmit, reordering, undo, tail loss probes), and transmission."""

from __future__ import annotations

import bisect

from netstack import events as ev
from netstack import speedups
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
        return self._cc.on_loss(self._cwnd, self._snd_max - self._snd_una, self._snd_mss)

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
                    self._note_reordering((fack - left) // self._snd_mss + 1)
                added.append((left, right))
        if not added:
            return False
        # The lowest ranges matter most.
        self._sacked = merge_ranges(ranges + added)[:_MAX_SACK_RANGES]
        return True

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

    def _pipe(self) -> int:
        """Bytes believed in the network (RFC 6675 section 4, simplified)."""
        nxt = self._snd_nxt
        outstanding = nxt - self._snd_una
        if not self._dupacks and not self._in_recovery and not self._sacked:
            return outstanding if outstanding > 0 else 0  # all of it (the common case)
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
        pipe = outstanding - min(self._dupacks, 1000) * self._snd_mss
        if self._in_recovery and self._high_rxt <= self._snd_una:
            pipe -= self._snd_mss
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

    def _transmit(
        self,
        now: float,
        out: list[TcpSegment | bytes],
        wire: tuple[bytes, bytes] | None = None,
    ) -> None:
        """Send what the windows allow (see ``tcp.py``), into ``out``; with ``wire``
        (the addresses) the runs of bulk data arrive there already as IP packets."""
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
        template: TcpSegment | None = None  # the first data segment sent by this call
        while sent < _MAX_SEGMENTS_PER_CALL:
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
                    _MAX_SEGMENTS_PER_CALL - sent,
                    now,
                    wire,
                )
                sent += count
                if sent >= _MAX_SEGMENTS_PER_CALL:
                    break
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
            floor = 1.5 * srtt + 0.2
            if floor > pto:  # max(): the same value without the call
                pto = floor
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
            if end > self._rexmit_high:
                self._rexmit_high = end
            if self._undo_pending and self._undo_tsval is None:
                self._undo_tsval = self._ts_now(now)
        if start >= self._snd_nxt or self._snd_nxt < end:
            self._snd_nxt = end + (1 if flags & FIN else 0)
        return self._segment(start, flags, payload, now)
