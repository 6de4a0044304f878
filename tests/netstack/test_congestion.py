"""CUBIC (RFC 9438) and NewReno (RFC 5681) congestion avoidance, driven directly."""

from __future__ import annotations

import pytest

from netstack.bbr import Bbr
from netstack.congestion import CUBIC_ALPHA, CUBIC_BETA, CUBIC_C, Cubic, NewReno, make
from netstack.rack import SendLog, SendRun, rate_sample
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


# -- BBR's inputs and window (netstack.rack.rate_sample, netstack.bbr.Bbr.set_window)


def _run(time: float, first_sent: float, delivered: int, delivered_time: float) -> SendRun:
    return SendRun(0, MSS, time, False, delivered, delivered_time, False, first_sent)


def test_rate_sample_takes_the_longer_of_the_send_and_ack_intervals() -> None:
    """ACKs that arrive compressed (a relay's burst, a batch read at once) deliver much
    in a short ACK interval: the sample divides by the send interval instead, so the
    rate cannot look higher than what was sent (draft-cheng 3.3)."""
    run = _run(time=1.010, first_sent=1.000, delivered=50_000, delivered_time=1.018)
    sample = rate_sample(run, 150_000, now=1.020, min_rtt=0.001)
    assert sample is not None
    assert sample.interval == pytest.approx(0.010)  # not the 2 ms the ACKs took
    assert sample.rate == pytest.approx(100_000 / 0.010)
    assert sample.rtt == pytest.approx(0.010)
    assert sample.prior_delivered == 50_000
    # spread ACKs: the ACK interval is the longer one
    run = _run(time=1.010, first_sent=1.008, delivered=50_000, delivered_time=1.005)
    sample = rate_sample(run, 150_000, now=1.025, min_rtt=0.001)
    assert sample is not None and sample.interval == pytest.approx(0.020)


def test_rate_sample_shorter_than_the_min_rtt_is_no_sample_and_retransmits_time_nothing() -> None:
    run = _run(time=1.0, first_sent=0.9995, delivered=0, delivered_time=0.9996)
    assert rate_sample(run, 100_000, now=1.0005, min_rtt=0.005) is None  # 0.9 ms < 5 ms
    assert rate_sample(run, 100_000, now=1.0005, min_rtt=0.0) is not None
    retransmitted = SendRun(0, MSS, 1.0, True, 0, 0.99, False, 0.98)
    sample = rate_sample(retransmitted, 30_000, now=1.02, min_rtt=0.01)
    assert sample is not None and sample.rtt == 0.0 and sample.rate > 0  # a rate, no RTT


def test_send_log_retire_returns_the_newest_run() -> None:
    log = SendLog()
    common = {"retransmitted": False, "delivered_time": 0.0, "app_limited": False}
    log.record(0, 1000, 1.0, delivered=0, **common)
    log.record(1000, 2000, 1.1, delivered=500, **common)
    log.record(2000, 3000, 1.2, delivered=900, **common)
    newest = log.retire(2500)
    assert newest is not None and newest.delivered == 500  # the third is not finished
    assert len(log) == 1 and log.runs[0].start == 2500
    assert log.retire(2500) is None


def _bbr(target_segments: int, filled: bool = True) -> Bbr:
    bbr = Bbr()
    bbr._mss = MSS
    bbr.cwnd_target = target_segments * MSS
    bbr.filled_pipe = filled
    return bbr


def test_bbr_window_in_recovery_loses_what_was_lost_grows_and_restores() -> None:
    """The window follows every ACK in recovery too: each byte marked lost takes one
    off, what was delivered is added (up to the target), and leaving restores the
    window from before (Linux's bbr_set_cwnd_to_recover_or_restore, without its packet
    conservation: see netstack.bbr)."""
    bbr = _bbr(100)
    cwnd = bbr.set_window(80 * MSS, 2 * MSS, 0, 1_000_000, recovering=False)
    assert cwnd == 82 * MSS  # grows by what was delivered, towards the target
    cwnd = bbr.set_window(cwnd, 2 * MSS, 5 * MSS, 1_002_000, recovering=True)
    assert cwnd == 79 * MSS and bbr.prior_cwnd == 82 * MSS  # saved before the cut
    cwnd = bbr.set_window(cwnd, 3 * MSS, MSS, 1_005_000, recovering=True)
    assert cwnd == 81 * MSS  # still growing in recovery
    cwnd = bbr.set_window(cwnd, 30 * MSS, 0, 1_035_000, recovering=True)
    assert cwnd == 100 * MSS  # never past the target
    cwnd = bbr.set_window(60 * MSS, MSS, 0, 1_036_000, recovering=False)
    assert cwnd == 83 * MSS  # the window from before, then what this ACK delivered
    # a second recovery saves the window of its own start
    cwnd = bbr.set_window(90 * MSS, 0, 0, 1_040_000, recovering=True)
    assert bbr.prior_cwnd == 90 * MSS


def test_bbr_window_before_the_pipe_is_full_and_in_probe_rtt() -> None:
    bbr = _bbr(100, filled=False)
    assert bbr.set_window(150 * MSS, 4 * MSS, 0, 10**7, False) == 150 * MSS  # above
    assert bbr.set_window(50 * MSS, 4 * MSS, 0, 10**7, False) == 54 * MSS
    bbr.cwnd_target = 0  # no model yet: grows freely
    assert bbr.set_window(150 * MSS, 4 * MSS, 0, 10**7, False) == 154 * MSS
    bbr = _bbr(100)
    assert bbr.set_window(150 * MSS, 4 * MSS, 0, 10**7, False) == 100 * MSS  # cut to it
    bbr.state = "probe_rtt"
    assert bbr.set_window(100 * MSS, 4 * MSS, 0, 10**7, False) == 4 * MSS
    assert bbr.set_window(MSS, 0, 10 * MSS, 10**7, False) == 4 * MSS  # the floor
    # an RTO: the window from before comes back when the re-sending is over
    bbr = _bbr(100)
    bbr.enter_loss(90 * MSS)
    assert bbr.set_window(MSS, MSS, 0, 10**7, True) == 4 * MSS
    assert bbr.set_window(20 * MSS, MSS, 0, 10**7, False) == 91 * MSS  # and grows
