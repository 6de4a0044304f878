"""RACK-TLP's loss detection (RFC 8985) and the send log it reads, for ``TcpConnection``.

Theory of operation
-------------------
RACK decides that a segment is lost by *time*: once a segment sent later has been
delivered (cumulatively acknowledged or SACKed), every segment sent earlier that is
still missing is lost as soon as it has been out longer than that delivery's RTT plus a
reordering window (section 6.2).  It needs to know when each byte was last sent.

``SendLog`` keeps that as *runs*, not segments: one entry per ``_transmit`` call's new
data (sent together, at one ``now``: a bulk sender's hundred segments are one entry)
and one per retransmission; a retransmission takes its bytes out of the older entries,
so each byte's entry is its latest transmission, and the entries stay in send-time
order (Linux's tsorted_sent_queue, per run).  Entries below SND.UNA are dropped by
``retire``, which is also where a finished run yields a delivery-rate sample for BBR
(the bytes delivered between its sending and its acknowledgement, over that time; see
draft-cheng-iccrg-delivery-rate-estimation).  Within an entry, bytes sent at the same
moment count as sent in sequence order (RFC 8985's RACK_sent_after tie-break).

``Rack`` holds RACK's state (RACK.xmit_ts, end_seq, rtt, fack, reordering_seen,
reo_wnd_mult and persist) and runs ``update`` (step 1-2: the most recently sent
delivered segment, and reordering seen) and ``detect_loss`` (step 5: which missing
bytes are lost now, and when to look again: the RACK reorder timer).  The connection
(``tcpsend.py``) owns the SACK scoreboard and the lost ranges and passes them in.

The reordering window (step 4) is zero until reordering has been seen while in
recovery or with three segments SACKed (so a plain loss is repaired as fast as with
three duplicate ACKs), else ``reo_wnd_mult`` quarters of the minimum RTT (at most SRTT).
The multiplier grows by one per round trip in which a D-SACK arrives or a
retransmission proves spurious (Eifel), and falls back to one after 16 recoveries
without either (section 6.2 step 4; RFC 8985 counts only D-SACKs, the timestamp proof
is the same evidence for a peer that sends none).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

_INFINITY = float("inf")
_REO_WND_PERSIST = 16  # recoveries a raised reordering window lasts (RFC 8985 6.2)
_DUPTHRESH = 3


@dataclass(slots=True)
class SendRun:
    """Bytes ``[start, end)`` sent together at ``time`` (their latest transmission)."""

    start: int
    end: int
    time: float
    retransmitted: bool
    delivered: int  # the connection's delivered count when they were sent
    delivered_time: float  # when that count last moved (the rate sample's start)
    app_limited: bool  # sent while the application had nothing more to send
    #: when the most recently delivered bytes had been sent, as these were (the sample's
    #: send interval: draft-cheng-iccrg-delivery-rate-estimation's P.first_sent_time)
    first_sent: float = 0.0


@dataclass(frozen=True, slots=True)
class RateSample:
    """One delivery-rate sample: ``delivered`` bytes reached the peer in ``interval``
    seconds (draft-cheng-iccrg-delivery-rate-estimation section 3.3)."""

    delivered: int
    interval: float
    rtt: float
    prior_delivered: int
    app_limited: bool

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.delivered / self.interval if self.interval > 0 else 0.0


def subtract(start: int, end: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``[start, end)`` outside the sorted, disjoint ``ranges``."""
    out: list[tuple[int, int]] = []
    index = bisect.bisect_right(ranges, (start, _INFINITY)) - 1
    if index < 0:
        index = 0
    cursor = start
    for s, e in ranges[index:]:
        if s >= end:
            break
        if e <= cursor:
            continue
        if s > cursor:
            out.append((cursor, s))
        cursor = max(cursor, e)
        if cursor >= end:
            break
    if cursor < end:
        out.append((cursor, end))
    return out


def newer(run: SendRun, than: SendRun) -> bool:
    """Was ``run`` sent after ``than`` (more delivered when it went, or later)?  The
    rate sample comes from the newest of the runs an ACK delivers."""
    return run.delivered > than.delivered or (
        run.delivered == than.delivered and run.time >= than.time
    )


def rate_sample(run: SendRun, delivered: int, now: float, min_rtt: float) -> RateSample | None:
    """The delivery-rate sample of ``run``, delivered by now (``delivered``: the
    connection's count now): the bytes delivered since it was sent over the longer of
    the send and the ACK intervals, so that ACKs arriving compressed (a batch read at
    once, a relay's burst) cannot make the rate look higher than what was sent; None
    when that interval is shorter than the minimum RTT, which no true sample is
    (draft-cheng-iccrg-delivery-rate-estimation 3.3, Linux's tcp_rate_gen).  A
    retransmitted run gives a rate but no RTT (Karn): its ``rtt`` is 0."""
    interval = max(run.time - run.first_sent, now - run.delivered_time)
    if interval <= 0 or interval < min_rtt:
        return None
    return RateSample(
        delivered - run.delivered,
        interval,
        0.0 if run.retransmitted else now - run.time,
        run.delivered,
        run.app_limited,
    )


def covered(ranges: list[tuple[int, int]]) -> int:
    """Bytes in ``ranges``."""
    return sum(e - s for s, e in ranges)


@dataclass(slots=True)
class SendLog:
    """When each outstanding byte was last sent, as runs in send-time order."""

    runs: deque[SendRun] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self.runs)

    def record(
        self,
        start: int,
        end: int,
        now: float,
        *,
        retransmitted: bool,
        delivered: int,
        delivered_time: float,
        app_limited: bool,
        first_sent: float = 0.0,
    ) -> None:
        """``[start, end)`` went out at ``now``; a retransmission takes its bytes out of
        the runs that held them."""
        if end <= start:
            return
        runs = self.runs
        if retransmitted:
            self._remove(start, end)
        elif runs:
            last = runs[-1]
            if (
                last.end == start
                and last.time == now
                and not last.retransmitted
                and last.app_limited == app_limited
            ):
                last.end = end  # the same burst, continued
                return
        runs.append(
            SendRun(
                start, end, now, retransmitted, delivered, delivered_time, app_limited, first_sent
            )
        )

    def _remove(self, start: int, end: int) -> None:
        runs = self.runs
        index = 0
        while index < len(runs):
            run = runs[index]
            if run.end <= start or run.start >= end:
                index += 1
                continue
            if run.start < start and run.end > end:  # split around the hole
                tail = SendRun(
                    end,
                    run.end,
                    run.time,
                    run.retransmitted,
                    run.delivered,
                    run.delivered_time,
                    run.app_limited,
                    run.first_sent,
                )
                run.end = start
                runs.insert(index + 1, tail)
                return
            if run.start < start:
                run.end = start
                index += 1
            elif run.end > end:
                run.start = end
                index += 1
            else:
                del runs[index]

    def retire(self, snd_una: int) -> SendRun | None:
        """Forget the runs acknowledged below ``snd_una``; returns the most recently
        sent of them (None if none finished), for ``rate_sample``."""
        runs = self.runs
        newest: SendRun | None = None
        while runs and runs[0].end <= snd_una:
            run = runs.popleft()
            if newest is None or newer(run, newest):
                newest = run
        if runs and runs[0].start < snd_una:
            runs[0].start = snd_una
        return newest

    def clear(self) -> None:
        self.runs.clear()


@dataclass(slots=True)
class Rack:
    """RACK's state for one connection (RFC 8985 section 6.1 names)."""

    xmit_ts: float = -_INFINITY  # send time of the most recently sent delivered bytes
    end_seq: int = 0
    rtt: float = 0.0
    fack: int = 0  # the highest delivered sequence end
    reordering_seen: bool = False
    reo_wnd_mult: int = 1
    reo_wnd_persist: int = 0
    dsack_round: float | None = None
    stats_marked: int = 0  # bytes marked lost by time
    #: the newest run delivered (SACKed or acknowledged) since the connection last took
    #: a rate sample (``rate_sample``), retransmitted or not
    sample_run: SendRun | None = None

    def update(
        self,
        log: SendLog,
        delivered: list[tuple[int, int, bool]],
        now: float,
        min_rtt: float,
        echoed_is_older: Callable[[float], bool],
    ) -> None:
        """Steps 1 and 2 for newly delivered ``(start, end, cumulative)`` ranges.  A
        retransmitted run whose delivery may be the original's (it came back faster than
        any RTT seen, or, acknowledged cumulatively, its ACK echoes an older timestamp:
        a SACK echoes the segment at the left edge, not its own) does not count (step 1).
        ``echoed_is_older(time)`` says whether the ACK's TSecr is older than a segment
        sent at ``time`` (always False without timestamps)."""
        for start, end, cumulative in delivered:
            fack_before = self.fack
            if end > fack_before:
                self.fack = end
            for run in log.runs:
                if run.end <= start or run.start >= end:
                    continue
                sample_run = self.sample_run
                if sample_run is None or newer(run, sample_run):
                    self.sample_run = run
                if run.retransmitted and (
                    now - run.time < min_rtt or (cumulative and echoed_is_older(run.time))
                ):
                    continue
                if not run.retransmitted and min(end, run.end) < fack_before:
                    self.reordering_seen = True  # delivered below the highest: reordered
                seg_end = min(end, run.end)
                if run.time > self.xmit_ts or (run.time == self.xmit_ts and seg_end > self.end_seq):
                    self.xmit_ts = run.time
                    self.end_seq = seg_end
                    self.rtt = now - run.time

    def on_spurious(self, now: float, srtt: float) -> None:
        """A D-SACK or a retransmission proved unnecessary: widen the window, at most
        once per round trip (step 3)."""
        self.reordering_seen = True
        if self.dsack_round is not None and now < self.dsack_round:
            return
        self.dsack_round = now + srtt
        self.reo_wnd_mult += 1
        self.reo_wnd_persist = _REO_WND_PERSIST

    def on_recovery_done(self) -> None:
        """One recovery ended without new evidence: the raised window decays (step 4)."""
        if self.reo_wnd_persist > 0:
            self.reo_wnd_persist -= 1
            if self.reo_wnd_persist == 0:
                self.reo_wnd_mult = 1

    def reo_wnd(
        self, in_recovery: bool, sacked_segments: int, min_rtt: float, srtt: float
    ) -> float:
        """Step 4: the reordering window."""
        if not self.reordering_seen and (in_recovery or sacked_segments >= _DUPTHRESH):
            return 0.0
        return min(self.reo_wnd_mult * min_rtt / 4, srtt)

    def detect_loss(
        self,
        log: SendLog,
        snd_una: int,
        sacked: list[tuple[int, int]],
        lost: list[tuple[int, int]],
        reo_wnd: float,
        now: float,
    ) -> tuple[list[tuple[int, int]], float | None]:
        """Step 5: the missing bytes sent before the most recently delivered ones and
        out for longer than RACK.rtt + reo_wnd are lost; returns them (not yet in
        ``lost``) and the earliest time another becomes so (the reorder timer), if any."""
        newly: list[tuple[int, int]] = []
        wake: float | None = None
        xmit_ts, end_seq = self.xmit_ts, self.end_seq
        runs = log.runs
        index = 0
        while index < len(runs):
            run = runs[index]
            if run.time > xmit_ts:
                break  # sent after the newest delivery: not judged yet (time order)
            start = run.start if run.start > snd_una else snd_una
            unsacked = subtract(start, run.end, sacked) if start < run.end else []
            if not unsacked:
                del runs[index]  # all delivered: nothing of it can be lost any more
                continue
            index += 1
            if run.time == xmit_ts:  # sent together: earlier sequence counts as earlier
                unsacked = [(s, min(e, end_seq)) for s, e in unsacked if s < end_seq]
            missing = [piece for s, e in unsacked for piece in subtract(s, e, lost)]
            if not missing:
                continue
            deadline = run.time + self.rtt + reo_wnd
            if deadline <= now:
                newly.extend(missing)
            elif wake is None or deadline < wake:
                wake = deadline
        self.stats_marked += covered(newly)
        return newly, wake
