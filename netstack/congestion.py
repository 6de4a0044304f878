"""Congestion avoidance for ``TcpConnection``: CUBIC (RFC 9438, the default, as on
Linux), NewReno (RFC 5681) and BBR v1 (``netstack/bbr.py``, a model-based controller).

The connection keeps cwnd and ssthresh and runs slow start, fast recovery and the RTO
itself; a controller decides only the two things the algorithms differ in:

* ``on_loss(cwnd, flight, mss)`` -> the new ssthresh after a congestion event (fast
  retransmit or the first RTO of a loss episode), remembering what it needs for the
  growth that follows;
* ``on_ack(cwnd, acked, mss, now, rtt)`` -> the new cwnd for ``acked`` bytes newly
  acknowledged in congestion avoidance (cwnd >= ssthresh, cwnd-limited, not in
  recovery).  It never returns less than ``cwnd``.

A model-based controller (``model_based = True``: BBR) owns cwnd instead: the
connection never slow-starts or reduces it, calls ``on_ack`` on every cwnd-limited ACK
(it may then return less than ``cwnd``) and feeds it delivery-rate samples
(``on_sample``); its ``pacing_rate`` paces the sender.

``snapshot()``/``restore()`` let an undone (spurious) reduction put the controller back
as well as cwnd and ssthresh.  Windows are bytes at the interface and segments inside
CUBIC's formulas, as in the RFC.
"""

from __future__ import annotations

from typing import Protocol

from netstack.bbr import Bbr


class CongestionControl(Protocol):
    name: str
    model_based: bool

    def on_loss(self, cwnd: int, flight: int, mss: int) -> int: ...

    def on_ack(self, cwnd: int, acked: int, mss: int, now: float, rtt: float) -> int: ...

    def snapshot(self) -> tuple[float, ...]: ...

    def restore(self, saved: tuple[float, ...]) -> None: ...


class NewReno:
    """One MSS per cwnd of acknowledged bytes (RFC 5681 eq. 3 with byte counting,
    RFC 3465); halve on loss (RFC 5681 eq. 4, FlightSize capped by cwnd as Linux's
    reno_ssthresh)."""

    name = "newreno"
    model_based = False
    __slots__ = ("_acked",)

    def __init__(self) -> None:
        self._acked = 0

    def on_loss(self, cwnd: int, flight: int, mss: int) -> int:
        self._acked = 0
        return max(min(flight, cwnd) // 2, 2 * mss)

    def on_ack(self, cwnd: int, acked: int, mss: int, now: float, rtt: float) -> int:
        self._acked += acked
        if self._acked >= cwnd:
            self._acked -= cwnd
            cwnd += mss
        return cwnd

    def snapshot(self) -> tuple[float, ...]:
        return (float(self._acked),)

    def restore(self, saved: tuple[float, ...]) -> None:
        self._acked = int(saved[0])


# RFC 9438 section 5: C = 0.4, beta_cubic = 0.7, alpha_cubic = 3 (1 - beta) / (1 + beta).
CUBIC_C = 0.4
CUBIC_BETA = 0.7
CUBIC_ALPHA = 3 * (1 - CUBIC_BETA) / (1 + CUBIC_BETA)


class Cubic:
    """RFC 9438: after a loss the window grows along
    ``W_cubic(t) = C (t - K)^3 + W_max`` (concave up to the old maximum, convex beyond
    it), never slower than the Reno-friendly estimate ``W_est`` (section 4.3), with fast
    convergence (section 4.7) and the target clamped to 1.5 cwnd (section 4.2)."""

    name = "cubic"
    model_based = False
    __slots__ = ("_epoch", "_k", "_pending", "_w_est", "_w_max")

    def __init__(self) -> None:
        self._w_max = 0.0  # segments
        self._k = 0.0  # seconds from the epoch start to W_max
        self._epoch: float | None = None  # start of this congestion-avoidance stage
        self._w_est = 0.0  # Reno-friendly window, segments
        self._pending = 0.0  # growth below one byte, carried to the next ACK

    @property
    def w_max(self) -> float:
        return self._w_max

    @property
    def k(self) -> float:
        return self._k

    def on_loss(self, cwnd: int, flight: int, mss: int) -> int:
        segments = cwnd / mss
        if segments < self._w_max:
            # Fast convergence: a window that did not reach the last maximum releases
            # bandwidth to newer flows (section 4.7).
            self._w_max = segments * (1 + CUBIC_BETA) / 2
        else:
            self._w_max = segments
        self._epoch = None
        self._pending = 0.0
        return max(int(min(flight, cwnd) * CUBIC_BETA), 2 * mss)

    def on_ack(self, cwnd: int, acked: int, mss: int, now: float, rtt: float) -> int:
        segments = cwnd / mss
        if self._epoch is None:
            # A new congestion-avoidance stage (section 4.2): K from the window now.
            self._epoch = now
            if segments < self._w_max:
                self._k = ((self._w_max - segments) / CUBIC_C) ** (1 / 3)
            else:
                self._k = 0.0
                self._w_max = segments
            self._w_est = segments
        acked_segments = acked / mss
        # Reno-friendly region (section 4.3): alpha_cubic until W_est passes W_max.
        alpha = CUBIC_ALPHA if self._w_est < self._w_max else 1.0
        self._w_est += alpha * acked_segments / segments
        t = now - self._epoch + rtt
        offset = t - self._k
        target = CUBIC_C * offset * offset * offset + self._w_max
        if target < self._w_est:
            grown = max(self._w_est, segments)
        else:
            target = min(target, 1.5 * segments)
            if target <= segments:
                return cwnd
            grown = segments + (target - segments) / segments * acked_segments
        growth = (grown - segments) * mss + self._pending
        whole = int(growth)
        self._pending = growth - whole
        return cwnd + whole if whole > 0 else cwnd

    def snapshot(self) -> tuple[float, ...]:
        epoch = -1.0 if self._epoch is None else self._epoch
        return (self._w_max, self._k, epoch, self._w_est)

    def restore(self, saved: tuple[float, ...]) -> None:
        self._w_max, self._k, epoch, self._w_est = saved
        self._epoch = None if epoch < 0 else epoch
        self._pending = 0.0


#: the names ``TcpConfig.congestion_control`` (and the agent's ``--congestion``) accept
NAMES = ("cubic", "newreno", "bbr")


def make(name: str) -> CongestionControl:
    if name == "cubic":
        return Cubic()
    if name == "newreno":
        return NewReno()
    if name == "bbr":
        return Bbr()
    raise ValueError(f"unknown congestion control {name!r} (one of {', '.join(NAMES)})")
