"""The path policy (``agent/paths.py``) on a virtual clock: UDP first, the stream when
a handshake goes unanswered or UDP goes silent, UDP probes on the stream and the move
back, back-off, and the forced transports."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from agent.paths import (
    BACKOFF_MAX,
    FALLBACK_AFTER,
    PROBE_AFTER,
    SILENT_AFTER,
    STREAM_LINGER,
    TCP,
    UDP,
    UDP_PROBE_INTERVAL,
    Action,
    Observation,
    PathPolicy,
)

A = Action


@dataclass
class Peer:
    """What the engine would show for the gateway's peer."""

    initiating: bool = False
    last_sent: float = float("-inf")
    last_handshake: float | None = None
    rx: int = 0
    tx: int = 0

    def seen(self) -> Observation:
        return Observation(self.initiating, self.last_sent, self.last_handshake, self.rx, self.tx)


@dataclass
class Run:
    """A policy ticked once a second from t=0, its actions recorded by time."""

    policy: PathPolicy
    peer: Peer = field(default_factory=Peer)
    now: float = 0.0
    log: list[tuple[float, Action]] = field(default_factory=list)

    def tick(self, until: float) -> list[Action]:
        actions: list[Action] = []
        while self.now < until:
            self.now = round(self.now + 1.0, 6)
            got = self.policy.tick(self.now, self.peer.seen())
            self.log += [(self.now, a) for a in got]
            actions += got
        return actions

    def first(self, action: Action) -> float:
        return next(t for t, a in self.log if a is action)


def handshake_never_answered(run: Run) -> None:
    run.peer.initiating, run.peer.last_sent = True, 0.0


def test_udp_first_then_the_stream_when_no_handshake_completes() -> None:
    run = Run(PathPolicy(0.0))
    run.tick(0)
    handshake_never_answered(run)
    assert A.CONNECT not in run.tick(FALLBACK_AFTER - 1)
    assert run.tick(FALLBACK_AFTER) == [A.CONNECT]
    assert run.policy.path == UDP and run.tick(FALLBACK_AFTER + 3) == []  # connecting
    assert run.policy.stream_up(run.now) == [A.USE_STREAM, A.INITIATE]
    assert run.policy.path == TCP and "no WireGuard handshake" in run.policy.reason
    # a handshake is asked for on the stream until one completes there
    assert run.tick(run.now + 2) == [A.INITIATE, A.INITIATE]
    run.peer.initiating, run.peer.last_handshake, run.peer.rx = False, run.now, 92
    assert A.INITIATE not in run.tick(run.now + 3)
    assert run.policy.switches == 1


def test_on_the_stream_udp_is_probed_and_used_again_when_it_answers() -> None:
    run = Run(PathPolicy(0.0))
    handshake_never_answered(run)
    run.tick(FALLBACK_AFTER)
    run.policy.stream_up(run.now)
    run.peer.initiating, run.peer.last_handshake = False, run.now
    start = run.now
    actions = run.tick(start + UDP_PROBE_INTERVAL)
    assert actions.count(A.PROBE_UDP) == 1 and run.first(A.PROBE_UDP) == start + UDP_PROBE_INTERVAL
    assert run.policy.udp_answered(run.now) == []  # no probe went out yet: not a proof
    run.policy.udp_probe_sent(run.now)
    assert A.PROBE_UDP not in run.tick(run.now + UDP_PROBE_INTERVAL - 1)  # one per interval
    assert run.policy.udp_answered(run.now) == [A.USE_UDP]
    assert run.policy.path == UDP and run.policy.reason == "UDP answers again"
    answered = run.now
    assert A.CLOSE_STREAM not in run.tick(answered + STREAM_LINGER - 1)
    assert run.tick(answered + STREAM_LINGER) == [A.CLOSE_STREAM]  # after the linger
    assert run.policy.stream_down(run.now, "not needed") == []
    assert run.policy.switches == 2


def test_udp_going_silent_mid_session_falls_back() -> None:
    run = Run(PathPolicy(0.0))
    run.peer.last_handshake, run.peer.rx, run.peer.tx = 0.0, 100, 100
    run.tick(5)
    run.peer.tx += 1400  # we send; nothing comes back from now on
    actions = run.tick(5 + PROBE_AFTER + 1)
    assert A.PROBE_TUNNEL in actions and A.CONNECT not in actions
    assert A.CONNECT in run.tick(5 + SILENT_AFTER + 2)
    # seen unanswered at the tick after the send (6 s), probed 3 s into it, given up 8 s in
    assert run.first(A.PROBE_TUNNEL) == 6 + PROBE_AFTER
    assert run.first(A.CONNECT) == 6 + SILENT_AFTER
    assert run.policy.stream_up(run.now) == [A.USE_STREAM, A.INITIATE]
    assert run.policy.reason == f"nothing back over UDP for {SILENT_AFTER:g}s"


def test_an_idle_udp_path_is_left_alone_and_answers_stop_the_probes() -> None:
    run = Run(PathPolicy(0.0))
    run.peer.last_handshake, run.peer.rx, run.peer.tx = 0.0, 100, 100
    assert run.tick(120) == []  # nothing sent, nothing expected
    run.peer.tx += 32  # a keepalive
    assert run.tick(run.now + PROBE_AFTER + 1).count(A.PROBE_TUNNEL) == 1
    run.peer.rx += 40  # the probe's answer (a reset through the tunnel)
    assert run.tick(run.now + 60) == []


def test_a_lost_stream_goes_back_to_udp_and_retries_with_backoff() -> None:
    run = Run(PathPolicy(0.0))
    handshake_never_answered(run)
    run.tick(FALLBACK_AFTER)
    for _ in range(8):  # every attempt fails at once
        assert run.policy.stream_down(run.now, "refused") == []
        for _ in range(100):
            if A.CONNECT in run.tick(run.now + 1):
                break
    gaps = _gaps([t for t, a in run.log if a is A.CONNECT])
    assert gaps[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert max(gaps) <= BACKOFF_MAX
    # once connected, losing it falls back to UDP (rule 4) and the backoff restarts
    run.policy.stream_up(run.now)
    assert run.policy.stream_down(run.now, "reset") == [A.USE_UDP]
    assert run.policy.path == UDP and run.policy.reason == "stream lost: reset"


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


def test_a_stream_that_arrives_after_udp_recovered_is_closed() -> None:
    run = Run(PathPolicy(0.0))
    handshake_never_answered(run)
    run.tick(FALLBACK_AFTER)
    assert run.log[-1][1] is A.CONNECT
    # the policy wanted the stream; while it connects UDP answers
    run.peer.initiating, run.peer.last_handshake = False, run.now
    assert run.policy.stream_up(run.now) == [A.USE_STREAM, A.INITIATE]
    # (wanting is sticky until a UDP probe proves UDP: the handshake may have been the
    # gateway's answer to the stream's own initiation)
    assert run.policy.path == TCP


def test_forced_tcp_never_probes_udp_and_reconnects() -> None:
    run = Run(PathPolicy(0.0, "tcp"))
    assert run.policy.path == TCP
    assert run.tick(1) == [A.CONNECT]
    assert run.policy.stream_up(run.now) == [A.USE_STREAM, A.INITIATE]
    run.peer.last_handshake = run.now
    assert A.PROBE_UDP not in run.tick(run.now + 5 * UDP_PROBE_INTERVAL)
    assert run.policy.stream_down(run.now, "reset") == []
    assert run.policy.path == TCP
    assert A.CONNECT in run.tick(run.now + 2)
    assert run.policy.udp_answered(run.now) == []


def test_forced_udp_and_no_stream_endpoint_never_connect() -> None:
    for policy in (PathPolicy(0.0, "udp"), PathPolicy(0.0, stream_available=False)):
        run = Run(policy)
        handshake_never_answered(run)
        run.peer.tx = 1
        assert A.CONNECT not in run.tick(300)
        assert policy.path == UDP


def test_a_gateway_that_moved_starts_over_on_udp() -> None:
    run = Run(PathPolicy(0.0))
    handshake_never_answered(run)
    run.tick(FALLBACK_AFTER)
    run.policy.stream_up(run.now)
    assert run.policy.reset(run.now, stream_available=True) == [A.CLOSE_STREAM, A.USE_UDP]
    assert run.policy.path == UDP and run.policy.reason == "gateway moved"
    run.peer.last_sent = run.now
    assert run.tick(run.now + FALLBACK_AFTER - 1) == []
    assert A.CONNECT in run.tick(run.now + 2)
