"""BBR v1 congestion control (draft-cardwell-iccrg-bbr-congestion-control-00, as in
Linux's tcp_bbr.c) for ``TcpConnection``: a model of the path -- its bottleneck
bandwidth and round-trip propagation time -- rather than a reaction to loss.

Theory of operation
-------------------
The connection feeds ``on_sample`` with delivery-rate samples once per ``_transmit``
call (``netstack.rack.rate_sample``: from the newest run of segments an ACK delivered,
SACKed or acknowledged, the bytes delivered since it was sent over the longer of the
send and the ACK intervals, draft-cheng-iccrg-delivery-rate-estimation); BBR keeps

* ``BtlBw``: the largest delivery rate of the last 10 round trips (app-limited samples
  count only when they raise it),
* ``RTprop``: the smallest RTT of the last 10 seconds,

and from them a pacing rate (``pacing_gain`` x BtlBw) and a congestion window target
(``cwnd_gain`` x BtlBw x RTprop, plus one pacing slice: the sender goes out a slice
at a time).  Linux adds three of its TSO bursts; with three of our slices (then 1 ms
of data each) at a sub-millisecond RTT most of what was in flight was headroom, into
a gateway whose 208 KiB socket buffer dropped a fifth of the stream
(bench/test_agent_bench.py's relays: 0.78x the kernel's BBR at 1% loss with three,
0.91x with one).  The slice is half a millisecond and the sender holds at most two:
with 1 ms slices BBR's short samples saw the 2 ms bursts, not the path (estimates of
1-1.5 Gbit/s on a path delivering 650 Mbit/s, 5,000-7,000 datagrams dropped at the
gateway per 150 MB; with half-millisecond slices 1,300-2,300, and the clean stream at
0.99x of CUBIC's instead of 0.88x).

The state machine moves the gains: STARTUP (2/ln 2, doubling the rate each round until
three rounds grow BtlBw by less than 25%), DRAIN (the inverse, until what is in flight
fits one BDP: the queue STARTUP built is gone), PROBE_BW (eight phases of one RTprop:
1.25 to probe for more, 0.75 to drain what that queued, then six at 1), and PROBE_RTT
(every 10 s without a new RTprop: four segments in flight for 200 ms and a round trip,
so the propagation time is seen without our own queue).

Loss does not change the model (BBR v1): the connection repairs it (RACK; PRR is not
used) while BBR keeps pacing at the estimated rate, which is what keeps throughput at
the bottleneck rate on a path with random loss.  The window is BBR's own
(``set_window``, after Linux's bbr_set_cwnd: run for every ACK, in recovery too, and
whether or not the window was full, which pacing usually keeps it from being): it grows
by what was delivered towards the target, loses one byte for every byte RACK marks
lost, and when a recovery (or an RTO's re-sending) is over the window from before it
comes back.  Growing in recovery matters: under 1% random loss a window of a few
hundred segments is in recovery most of the time, and a STARTUP that stopped growing
there left with a tenth of the path's rate.  Linux also cuts the window to what is in
flight plus what was delivered for a recovery's first round (packet conservation); we
do not: paced, what is in flight is about one BDP, at 1% loss a recovery starts nearly
every round, and the cut kept the window at what was in flight, so the 1.25 phase could
not raise the rate and the estimate only fell (on a 20 ms path from 165 to 28 Mbit/s
within a second, bench trace; without the cut no round fell below 118).
"""

from __future__ import annotations

import math

from netstack.rack import RateSample

HIGH_GAIN = 2 / math.log(2)  # 2.885: doubles the delivery rate each round
DRAIN_GAIN = 1 / HIGH_GAIN
CWND_GAIN = 2.0
PACING_GAIN_CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
BW_WINDOW_ROUNDS = 10
MIN_RTT_WINDOW = 10.0  # seconds
PROBE_RTT_TIME = 0.2
MIN_CWND_SEGMENTS = 4
FULL_BW_GROWTH = 1.25
FULL_BW_ROUNDS = 3
INITIAL_WINDOW_SEGMENTS = 10  # the window grows freely until this much was delivered
PACING_SLICE = 0.0005  # seconds of data per pacing slice (netstack.tcpsend paces by slices)

STARTUP, DRAIN, PROBE_BW, PROBE_RTT = "startup", "drain", "probe_bw", "probe_rtt"


class Bbr:
    """BBR v1: see the module docstring."""

    name = "bbr"
    model_based = True  # owns cwnd and the pacing rate; no ssthresh, no PRR

    def __init__(self) -> None:
        self.state = STARTUP
        self.pacing_gain = HIGH_GAIN
        self.cwnd_gain = HIGH_GAIN
        self._bw_by_round: dict[int, float] = {}
        self.min_rtt = math.inf
        self._min_rtt_stamp = 0.0
        self.round_count = 0
        self._next_round_delivered = 0
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self.filled_pipe = False
        self._cycle_index = 0
        self._cycle_stamp = 0.0
        self._probe_rtt_done: float | None = None
        self._probe_rtt_round: int | None = None
        self.pacing_rate = 0.0  # bytes per second; 0 until the first estimate
        self.cwnd_target = 0  # bytes; 0 until the first estimate
        self._mss = 1460
        self.prior_cwnd = 0  # the window before the recovery (restored on leaving)
        self._recovering = False

    # -- the connection's controller interface (netstack.congestion.CongestionControl)

    def on_loss(self, cwnd: int, flight: int, mss: int) -> int:
        return cwnd  # loss is not a signal of the model (BBR v1)

    def on_ack(self, cwnd: int, acked: int, mss: int, now: float, rtt: float) -> int:
        """Unchanged: the connection calls ``set_window`` for every ACK instead (the
        hot path calls this only when the window was full, which pacing rarely lets
        it be)."""
        return cwnd

    # -- the window (Linux's bbr_set_cwnd and bbr_set_cwnd_to_recover_or_restore)

    def set_window(self, cwnd: int, acked: int, lost: int, delivered: int, recovering: bool) -> int:
        """The window after ACKs that delivered ``acked`` bytes and had ``lost`` bytes
        marked lost, ``delivered`` counted so far; ``recovering``: the connection is in
        fast recovery or re-sending after an RTO.  Runs on every ACK, in recovery too,
        and whether or not the window was full (the pacing rate, not the window, is
        what usually holds BBR back)."""
        mss = self._mss
        floor = MIN_CWND_SEGMENTS * mss
        if recovering and not self._recovering:
            self._save_window(cwnd)  # before the losses come off (Linux's bbr_ssthresh)
        elif not recovering and self._recovering:
            self._recovering = False
            cwnd = max(cwnd, self.prior_cwnd)
        if lost:
            cwnd = max(cwnd - lost, mss)
        target = self.cwnd_target
        if self.filled_pipe and target > 0:
            cwnd = min(cwnd + acked, target)
        elif target <= 0 or cwnd < target or delivered < INITIAL_WINDOW_SEGMENTS * mss:
            cwnd += acked
        cwnd = max(cwnd, floor)
        if self.state == PROBE_RTT:
            cwnd = min(cwnd, floor)
        return cwnd

    def enter_loss(self, cwnd: int) -> None:
        """An RTO: the window is the connection's to reset; the one from before comes
        back when the re-sending is over."""
        self._save_window(cwnd)

    def _save_window(self, cwnd: int) -> None:
        if self._recovering or self.state == PROBE_RTT:
            self.prior_cwnd = max(self.prior_cwnd, cwnd)
        else:
            self.prior_cwnd = cwnd
        self._recovering = True

    def snapshot(self) -> tuple[float, ...]:
        return ()

    def restore(self, saved: tuple[float, ...]) -> None:
        return None  # the model survives a spurious recovery unchanged

    # -- the model

    @property
    def btl_bw(self) -> float:
        """The bottleneck bandwidth estimate, bytes per second (0: none yet)."""
        return max(self._bw_by_round.values(), default=0.0)

    def bdp(self, gain: float = 1.0) -> float:
        """``gain`` x BtlBw x RTprop, bytes (0 without both estimates)."""
        if not self._bw_by_round or math.isinf(self.min_rtt):
            return 0.0
        return gain * self.btl_bw * self.min_rtt

    def on_sample(
        self,
        sample: RateSample | None,
        now: float,
        inflight: int,
        mss: int,
        cwnd: int,
        srtt: float | None,
    ) -> None:
        """Update the model from one delivery-rate sample (None: only the clocks)."""
        self._mss = mss
        round_start = False
        if sample is not None:
            delivered = sample.prior_delivered + sample.delivered
            if sample.prior_delivered >= self._next_round_delivered:
                self._next_round_delivered = delivered
                self.round_count += 1
                round_start = True
            rate = sample.rate
            if rate > 0 and (not sample.app_limited or rate >= self.btl_bw):
                current = self._bw_by_round.get(self.round_count, 0.0)
                if rate > current:
                    self._bw_by_round[self.round_count] = rate
            oldest = self.round_count - BW_WINDOW_ROUNDS
            for key in [k for k in self._bw_by_round if k <= oldest]:
                del self._bw_by_round[key]
            expired = now > self._min_rtt_stamp + MIN_RTT_WINDOW
            if sample.rtt > 0 and (sample.rtt <= self.min_rtt or expired):
                self.min_rtt = sample.rtt
                self._min_rtt_stamp = now
            if round_start and not sample.app_limited and not self.filled_pipe:
                self._check_full_pipe()
        self._advance_state(now, inflight, mss, cwnd, round_start)
        self._set_outputs(mss, cwnd, srtt)

    def _check_full_pipe(self) -> None:
        bw = self.btl_bw
        if bw >= self._full_bw * FULL_BW_GROWTH:
            self._full_bw = bw
            self._full_bw_rounds = 0
            return
        self._full_bw_rounds += 1
        if self._full_bw_rounds >= FULL_BW_ROUNDS:
            self.filled_pipe = True

    def _advance_state(
        self, now: float, inflight: int, mss: int, cwnd: int, round_start: bool
    ) -> None:
        if self.state == STARTUP and self.filled_pipe:
            self.state = DRAIN
            self.pacing_gain = DRAIN_GAIN
            self.cwnd_gain = HIGH_GAIN
        if self.state == DRAIN and inflight <= self.bdp():
            self._enter_probe_bw(now)
        if self.state == PROBE_BW:
            elapsed = now - self._cycle_stamp > self.min_rtt
            gain = self.pacing_gain
            if (
                (elapsed and (gain <= 1.0 or inflight >= self.bdp(gain)))
                or (gain < 1.0 and inflight <= self.bdp())
                or (gain > 1.0 and elapsed and round_start)
            ):
                self._cycle_index = (self._cycle_index + 1) % len(PACING_GAIN_CYCLE)
                self._cycle_stamp = now
                self.pacing_gain = PACING_GAIN_CYCLE[self._cycle_index]
        expired = now > self._min_rtt_stamp + MIN_RTT_WINDOW
        if expired and self.state != PROBE_RTT and not math.isinf(self.min_rtt):
            self.state = PROBE_RTT
            self.pacing_gain = 1.0
            self.cwnd_gain = 1.0
            self._probe_rtt_done = None
        if self.state == PROBE_RTT:
            if self._probe_rtt_done is None and inflight <= MIN_CWND_SEGMENTS * mss:
                self._probe_rtt_done = now + PROBE_RTT_TIME
                self._probe_rtt_round = self.round_count + 1
            elif (
                self._probe_rtt_done is not None
                and now >= self._probe_rtt_done
                and self._probe_rtt_round is not None
                and self.round_count >= self._probe_rtt_round
            ):
                self._min_rtt_stamp = now
                if self.filled_pipe:
                    self._enter_probe_bw(now)
                else:
                    self.state = STARTUP
                    self.pacing_gain = HIGH_GAIN
                    self.cwnd_gain = HIGH_GAIN

    def _enter_probe_bw(self, now: float) -> None:
        self.state = PROBE_BW
        self.cwnd_gain = CWND_GAIN
        # Linux starts at a random phase other than the draining one; the core has no
        # random source, so the round count picks it (any phase but 0.75 works).
        self._cycle_index = 2 + self.round_count % (len(PACING_GAIN_CYCLE) - 2)
        self._cycle_stamp = now
        self.pacing_gain = PACING_GAIN_CYCLE[self._cycle_index]

    def _set_outputs(self, mss: int, cwnd: int, srtt: float | None) -> None:
        bw = self.btl_bw
        if bw > 0:
            rate = self.pacing_gain * bw
            if self.filled_pipe or rate > self.pacing_rate:
                self.pacing_rate = rate
        elif srtt:
            self.pacing_rate = HIGH_GAIN * cwnd / max(srtt, 1e-4)
        floor = MIN_CWND_SEGMENTS * mss
        if self.state == PROBE_RTT:
            self.cwnd_target = floor
            return
        bdp = self.bdp(self.cwnd_gain)
        if bdp <= 0:
            self.cwnd_target = 0
            return
        quantum = max(2 * mss, self.pacing_rate * PACING_SLICE)
        self.cwnd_target = max(int(bdp + quantum), floor)
