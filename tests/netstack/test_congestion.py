"""CUBIC (RFC 9438) and NewReno (RFC 5681) congestion avoidance, driven directly."""

from __future__ import annotations

import pytest

from netstack.congestion import CUBIC_ALPHA, CUBIC_BETA, CUBIC_C, Cubic, NewReno, make
from netstack.tcp import TcpConfig

MSS = 1000


def run_rounds(
    cc: Cubic | NewReno, cwnd: int, rtt: float, rounds: int, start: float = 0.0
) -> list[int]:
    """Acknowledge one cwnd per RTT, two segments per ACK (delayed ACKs), for ``rounds``
    RTTs; returns the window at the end of each round."""
    now = start
    history: list[int] = []
    for _ in range(rounds):
        window = remaining = cwnd
        while remaining > 0:
            acked = min(2 * MSS, remaining)
            cwnd = cc.on_ack(cwnd, acked, MSS, now + rtt * (1 - remaining / window), rtt)
            remaining -= acked
        now += rtt
        history.append(cwnd)
    return history


def test_cubic_reduces_to_beta_and_remembers_w_max() -> None:
    cc = Cubic()
    assert cc.on_loss(100 * MSS, 100 * MSS, MSS) == int(100 * MSS * CUBIC_BETA)
    assert cc.w_max == 100
    # FlightSize is capped by cwnd (as Linux); never below two segments.
    assert Cubic().on_loss(10 * MSS, 50 * MSS, MSS) == 7 * MSS
    assert Cubic().on_loss(2 * MSS, 2 * MSS, MSS) == 2 * MSS


def test_cubic_window_follows_w_cubic_concave_then_convex() -> None:
    cc = Cubic()
    cwnd = cc.on_loss(100 * MSS, 100 * MSS, MSS)
    rtt = 0.1
    k = ((100 - 70) / CUBIC_C) ** (1 / 3)  # RFC 9438 eq. 2: about 4.2 s
    rounds = int(2 * k / rtt)
    history = run_rounds(cc, cwnd, rtt, rounds)
    assert cc.k == pytest.approx(k)
    reno = 70.0  # W_est: alpha_cubic per RTT, 1 per RTT once past W_max (section 4.3)
    for n, window in enumerate(history, start=1):
        reno += CUBIC_ALPHA if reno < 100 else 1.0
        # At the end of round n the window aims at W_cubic one RTT ahead (section 4.2).
        cubic = CUBIC_C * ((n + 1) * rtt - k) ** 3 + 100
        assert window / MSS == pytest.approx(max(cubic, reno), abs=3.0), n
    at_k = history[int(k / rtt)] / MSS
    assert at_k == pytest.approx(100, abs=2.0)  # plateau at the old maximum
    first_half = history[int(k / rtt / 2)] - history[0]
    second_half = history[int(k / rtt)] - history[int(k / rtt / 2)]
    assert first_half > second_half  # concave below W_max
    assert history[-1] > 100 * MSS  # convex probing beyond it


def test_cubic_growth_per_rtt_is_clamped_to_half_a_window() -> None:
    cc = Cubic()
    cwnd = cc.on_loss(1000 * MSS, 1000 * MSS, MSS)
    # Long after the epoch started the cubic target is far away; one RTT may still
    # only grow the window to 1.5 times (RFC 9438 section 4.2).
    cwnd = cc.on_ack(cwnd, MSS, MSS, 0.0, 0.1)
    before = cwnd
    for i in range(before // MSS):
        cwnd = cc.on_ack(cwnd, MSS, MSS, 1000.0 + i * 1e-4, 0.1)
    assert cwnd <= 1.5 * before + MSS


def test_cubic_reno_friendly_region_at_short_rtt() -> None:
    # At 1 ms RTT the cubic curve is nearly flat for a while; the window must still
    # grow at least as fast as Reno would with beta 0.7 (RFC 9438 section 4.3).
    cc = Cubic()
    cwnd = cc.on_loss(100 * MSS, 100 * MSS, MSS)
    history = run_rounds(cc, cwnd, 0.001, 200)
    growth = (history[-1] - cwnd) / MSS
    assert growth >= 0.9 * CUBIC_ALPHA * 200


def test_cubic_fast_convergence() -> None:
    cc = Cubic()
    cc.on_loss(100 * MSS, 100 * MSS, MSS)
    cc.on_loss(90 * MSS, 90 * MSS, MSS)  # did not get back to W_max: release bandwidth
    assert cc.w_max == pytest.approx(90 * (1 + CUBIC_BETA) / 2)
    cc.on_loss(120 * MSS, 120 * MSS, MSS)
    assert cc.w_max == 120


def test_cubic_starts_probing_at_once_above_w_max() -> None:
    cc = Cubic()  # no loss yet: W_max = 0, so the epoch starts at the current window
    cwnd = cc.on_ack(50 * MSS, MSS, MSS, 0.0, 0.05)
    assert cc.k == 0.0 and cc.w_max == 50
    assert cwnd >= 50 * MSS


def test_cubic_on_ack_never_shrinks_and_carries_fractions() -> None:
    cc = Cubic()
    cwnd = cc.on_loss(400 * MSS, 400 * MSS, MSS)
    start = cwnd
    for i in range(2000):
        new = cc.on_ack(cwnd, 10, MSS, i * 1e-5, 0.01)  # tiny ACKs: sub-byte growth each
        assert new >= cwnd
        cwnd = new
    assert cwnd > start  # the fractions added up


def test_cubic_snapshot_restore() -> None:
    cc = Cubic()
    cc.on_loss(100 * MSS, 100 * MSS, MSS)
    cc.on_ack(70 * MSS, MSS, MSS, 1.0, 0.1)
    saved = cc.snapshot()
    cc.on_loss(70 * MSS, 70 * MSS, MSS)
    assert cc.w_max != 100
    cc.restore(saved)
    assert cc.w_max == 100 and cc.snapshot() == saved


def test_newreno_one_segment_per_window_and_halving() -> None:
    cc = NewReno()
    assert cc.on_loss(100 * MSS, 80 * MSS, MSS) == 40 * MSS
    assert cc.on_loss(100 * MSS, 300 * MSS, MSS) == 50 * MSS
    cwnd = 40 * MSS
    history = run_rounds(cc, cwnd, 0.1, 10)
    assert [h // MSS for h in history] == list(range(41, 51))


def test_make_and_config_validation() -> None:
    assert make("cubic").name == "cubic"
    assert make("newreno").name == "newreno"
    assert make("bbr").name == "bbr" and make("bbr").model_based
    assert TcpConfig().congestion_control == "cubic"
    with pytest.raises(ValueError, match="vegas"):
        TcpConfig(congestion_control="vegas")
    with pytest.raises(ValueError, match="tlp_max_ack_delay"):
        TcpConfig(tlp_max_ack_delay=-1.0)
