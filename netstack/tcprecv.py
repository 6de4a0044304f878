"""The receive side of a TCP connection (see ``tcp.py`` for the theory of operation):
in-order bytes to the read buffer, out-of-order segments held and reported with SACK
blocks, the advertised window (receiver silly-window avoidance, auto-tuning), the
peer's FIN."""

from __future__ import annotations

from netstack import events as ev
from netstack.tcpbase import _RECEIVE_DATA_STATES, MASK32, TcpBase, TcpState, merge_ranges


class ReceiveSide(TcpBase):
    """Receive-side methods of ``TcpConnection``."""

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
        # Comparisons rather than max()/min(): the same values, on every ACK's path.
        rcv_nxt = self._rcv_nxt
        rcv_adv = self._rcv_adv
        cap = self._rcv_cap
        free = cap - len(self._rcvbuf)
        right = rcv_nxt + free if free > 0 else rcv_nxt
        step = cap // 2
        if self.config.mss < step:
            step = self.config.mss
        if right - rcv_adv < step:
            right = rcv_adv if rcv_adv > rcv_nxt else rcv_nxt
        shift = self._rcv_wscale
        field = (right - rcv_nxt) >> shift
        if rcv_nxt + (field << shift) < rcv_adv:
            field += 1  # round up rather than shrink (as Linux does)
        if field > 0xFFFF:
            field = 0xFFFF
        edge = rcv_nxt + (field << shift)
        if edge > rcv_adv:
            self._rcv_adv = edge
        return field

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
        self._ooo_ranges = merge_ranges([*self._ooo_ranges, (seq, end)])

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
