"""WireGuard benchmarks: handshakes/s per role and transport packets/s, each beside
raw ChaCha20-Poly1305 on the same payload in the same run.

Run: ``pytest bench/test_wireguard_bench.py --benchmark-columns=median,ops``.
Transport rows time a batch of ``BATCH`` packets through ``WireGuardEngine.send_packets`` /
``WireGuardEngine.receive_datagrams`` (as the asyncio adapter drives it: one call per socket
drain or per stack pass, then one drain of the device's output);
the ``raw`` rows time ``BATCH`` bare ``ChaCha20Poly1305`` calls on equal payloads.
The ratio raw/ours of the medians is the fraction of raw AEAD speed we keep.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from netstack.wireguard.engine import WireGuardEngine
from tests.netstack.wireguard.harness import (
    A_ADDR,
    A_IP,
    B_IP,
    Clock,
    Net,
    fresh_initiation,
    ipv4_udp,
    pair,
)

BATCH = 100
SIZES = [1420, 64]


def _established() -> tuple[Net, WireGuardEngine, WireGuardEngine, Clock]:
    clock = Clock()
    net, a, b = pair(clock)
    a.send_packet(ipv4_udp(A_IP, B_IP, b"hello"), clock.now)
    net.pump()
    b.packets_received()
    return net, a, b, clock


def _packet(size: int) -> bytes:
    packet = ipv4_udp(A_IP, B_IP, bytes(size - 28))
    assert len(packet) == size
    return packet


@pytest.mark.parametrize("size", SIZES)
def test_encrypt_ours(benchmark: Any, size: int) -> None:
    benchmark.group = f"encrypt-{size}B-x{BATCH}"
    _, a, _, clock = _established()
    packets = [_packet(size)] * BATCH
    send = a.send_packets
    now = clock.now

    def run() -> None:
        send(packets, now)
        assert len(a.datagrams_to_send()) == BATCH

    benchmark(run)


@pytest.mark.parametrize("size", SIZES)
def test_encrypt_raw(benchmark: Any, size: int) -> None:
    benchmark.group = f"encrypt-{size}B-x{BATCH}"
    aead = ChaCha20Poly1305(bytes(32))
    payload = _packet(size)
    nonces = [bytes(4) + i.to_bytes(8, "little") for i in range(BATCH)]

    def run() -> None:
        for nonce in nonces:
            aead.encrypt(nonce, payload, None)

    benchmark(run)


def _batches(size: int, rounds: int) -> tuple[WireGuardEngine, Iterator[list[tuple[bytes, Any]]]]:
    _, a, b, clock = _established()
    packet = _packet(size)
    pool: list[list[tuple[bytes, Any]]] = []
    for _ in range(rounds + 2):
        for _ in range(BATCH):
            a.send_packet(packet, clock.now)
        pool.append([(d, A_ADDR) for d, _ in a.datagrams_to_send()])
    return b, iter(pool)


@pytest.mark.parametrize("size", SIZES)
def test_decrypt_ours(benchmark: Any, size: int) -> None:
    benchmark.group = f"decrypt-{size}B-x{BATCH}"
    rounds = 200
    b, batches = _batches(size, rounds)
    receive = b.receive_datagrams
    now = 1000.0

    def setup() -> tuple[tuple[list[tuple[bytes, Any]]], dict[str, Any]]:
        return (next(batches),), {}

    def run(batch: list[tuple[bytes, Any]]) -> None:
        receive(batch, now)
        assert len(b.packets_received()) == BATCH

    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("size", SIZES)
def test_decrypt_raw(benchmark: Any, size: int) -> None:
    """Same shape as test_decrypt_ours: a fresh batch of distinct ciphertexts per round."""
    benchmark.group = f"decrypt-{size}B-x{BATCH}"
    rounds = 200
    aead = ChaCha20Poly1305(bytes(32))
    payload = _packet(size)
    nonces = [bytes(4) + i.to_bytes(8, "little") for i in range(BATCH * (rounds + 2))]
    pool = [(n, aead.encrypt(n, payload, None)) for n in nonces]
    batches = iter([pool[i : i + BATCH] for i in range(0, len(pool), BATCH)])

    def setup() -> tuple[tuple[list[tuple[bytes, bytes]]], dict[str, Any]]:
        return (next(batches),), {}

    def run(batch: list[tuple[bytes, bytes]]) -> None:
        for nonce, ciphertext in batch:
            aead.decrypt(nonce, ciphertext, None)

    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1)


def _handshake_parts() -> tuple[Net, WireGuardEngine, WireGuardEngine, Clock]:
    clock = Clock()
    net, a, b = pair(clock)
    return net, a, b, clock


def test_handshake_initiator_create(benchmark: Any) -> None:
    benchmark.group = "handshake"
    _, a, b, clock = _handshake_parts()
    peer = a.peer(b.public_key)
    assert peer is not None

    def run() -> None:
        peer.last_sent_handshake = float("-inf")
        a.initiate_handshake(b.public_key, clock.now)
        assert len(a.datagrams_to_send()) == 1

    benchmark(run)


def test_handshake_responder(benchmark: Any) -> None:
    """Consume an initiation and create the response (the responder's whole role)."""
    benchmark.group = "handshake"
    _, a, b, clock = _handshake_parts()

    def setup() -> tuple[tuple[bytes], dict[str, Any]]:
        return (fresh_initiation(a, b, clock),), {}

    def run(data: bytes) -> None:
        b.receive_datagram(data, A_ADDR, clock.now)
        assert len(b.datagrams_to_send()) == 1

    benchmark.pedantic(run, setup=setup, rounds=300, warmup_rounds=2)


def test_handshake_initiator_consume_response(benchmark: Any) -> None:
    benchmark.group = "handshake"
    _, a, b, clock = _handshake_parts()

    def setup() -> tuple[tuple[bytes], dict[str, Any]]:
        b.receive_datagram(fresh_initiation(a, b, clock), A_ADDR, clock.now)
        ((response, _),) = b.datagrams_to_send()
        return (response,), {}

    def run(response: bytes) -> None:
        a.receive_datagram(response, ("192.0.2.2", 51820), clock.now)
        assert len(a.datagrams_to_send()) == 1  # the confirming keepalive

    benchmark.pedantic(run, setup=setup, rounds=300, warmup_rounds=2)


def test_handshake_raw_x25519_floor(benchmark: Any) -> None:
    """Reference: the 2 X25519 operations of an initiator's message 1 plus keygen."""
    benchmark.group = "handshake"
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    rng = random.Random(3)
    peer_public = X25519PrivateKey.from_private_bytes(rng.randbytes(32)).public_key()

    def run() -> None:
        eph = X25519PrivateKey.from_private_bytes(rng.randbytes(32))
        eph.public_key().public_bytes_raw()
        eph.exchange(peer_public)

    benchmark(run)
