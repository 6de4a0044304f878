"""Known-answer tests: Noise vectors, WireGuard constants, KDF, HChaCha20/XChaCha20,
plus a differential test against the independent ``noiseprotocol`` implementation."""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import json
import random
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from netstack.wireguard import noise
from netstack.wireguard.crypto import (
    dh,
    hchacha20,
    hmac,
    kdf1,
    kdf2,
    kdf3,
    private_key_from_bytes,
    public_key_of,
    xaead_decrypt,
    xaead_encrypt,
)
from netstack.wireguard.errors import HandshakeError

# The shared folder sits next to the repository (../shared), as in CI.
VECTORS = (
    Path(__file__).resolve().parents[4]
    / "shared/vectors/noise_IKpsk2_25519_ChaChaPoly_BLAKE2s.json"
)
x = bytes.fromhex


def test_noise_vector_handshake_and_transport() -> None:
    v = json.loads(VECTORS.read_text())
    assert v["protocol_name"] == "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    init_static = private_key_from_bytes(x(v["init_static"]))
    resp_static = private_key_from_bytes(x(v["resp_static"]))
    init_eph = private_key_from_bytes(x(v["init_ephemeral"]))
    resp_eph = private_key_from_bytes(x(v["resp_ephemeral"]))
    assert public_key_of(resp_static) == x(v["init_remote_static"])
    psk = x(v["init_psks"][0])
    assert x(v["resp_psks"][0]) == psk
    msgs = v["messages"]

    base = noise.SymmetricState.initial(v["protocol_name"].encode(), x(v["init_prologue"]))
    ini = noise.begin(public_key_of(resp_static), base)
    res = noise.begin(public_key_of(resp_static), base)

    eph, enc_s, enc_p = noise.write_initiation(
        ini,
        init_eph,
        public_key_of(init_static),
        public_key_of(resp_static),
        dh(init_static, public_key_of(resp_static)),
        x(msgs[0]["payload"]),
    )
    assert (eph + enc_s + enc_p).hex() == msgs[0]["ciphertext"]
    remote = noise.read_initiation_static(res, resp_static, eph, enc_s)
    assert remote == public_key_of(init_static)
    assert noise.read_initiation_payload(res, dh(resp_static, remote), enc_p) == x(
        msgs[0]["payload"]
    )

    eph2, enc2 = noise.write_response(res, resp_eph, eph, remote, psk, x(msgs[1]["payload"]))
    assert (eph2 + enc2).hex() == msgs[1]["ciphertext"]
    payload = noise.read_response(ini, init_eph, init_static, eph2, psk, enc2)
    assert payload == x(msgs[1]["payload"])
    assert ini.h.hex() == res.h.hex() == v["handshake_hash"]

    i_send, i_recv = ini.split()
    r_recv, r_send = res.split()
    assert (i_send, i_recv) == (r_recv, r_send)
    counters = {True: 0, False: 0}
    for n, msg in enumerate(msgs[2:]):
        from_initiator = n % 2 == 0
        key = i_send if from_initiator else r_send
        counter = counters[from_initiator]
        counters[from_initiator] += 1
        nonce = bytes(4) + counter.to_bytes(8, "little")
        ct = ChaCha20Poly1305(key).encrypt(nonce, x(msg["payload"]), b"")
        assert ct.hex() == msg["ciphertext"]


def test_initial_chain_key_and_hash() -> None:
    ck = hashlib.blake2s(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s").digest()
    h = hashlib.blake2s(ck + b"WireGuard v1 zx2c4 Jason@zx2c4.com").digest()
    assert ck == noise.INITIAL_CHAIN_KEY
    assert h == noise.INITIAL_HASH
    # the well-known constants (also hard-coded in other WireGuard implementations)
    assert ck.hex() == "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
    assert h.hex() == "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"


KDF_VECTORS = [  # wireguard-go device/kdf_test.go
    (
        "746573742d6b6579",
        "746573742d696e707574",
        "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
        "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
        "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24",
    ),
    (
        "776972656775617264",
        "776972656775617264",
        "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
        "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
        "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160",
    ),
    (
        "",
        "",
        "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
        "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
        "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e",
    ),
]


@pytest.mark.parametrize(("key", "data", "t0", "t1", "t2"), KDF_VECTORS)
def test_kdf_vectors(key: str, data: str, t0: str, t1: str, t2: str) -> None:
    assert kdf1(x(key), x(data)).hex() == t0
    assert [t.hex() for t in kdf2(x(key), x(data))] == [t0, t1]
    assert [t.hex() for t in kdf3(x(key), x(data))] == [t0, t1, t2]


def test_hmac_matches_stdlib() -> None:
    rng = random.Random(1)
    for size in (0, 1, 31, 32, 33, 63, 64, 65, 200):
        key, data = rng.randbytes(size), rng.randbytes(size * 3)
        assert hmac(key, data) == std_hmac.new(key, data, hashlib.blake2s).digest()


def test_hchacha20_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 section 2.2.1
    key = bytes(range(32))
    nonce = x("000000090000004a0000000031415927")
    expected = x("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")
    assert hchacha20(key, nonce) == expected


def _reference_hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 written out from the draft (section 2.2): 20 rounds, no feed-forward."""
    mask = 0xFFFFFFFF
    s = [*struct.unpack("<4I", b"expand 32-byte k"), *struct.unpack("<8I", key)]
    s += struct.unpack("<4I", nonce16)

    def rotl(value: int, bits: int) -> int:
        return ((value << bits) | (value >> (32 - bits))) & mask

    def quarter(a: int, b: int, c: int, d: int) -> None:  # RFC 8439 section 2.1
        s[a] = (s[a] + s[b]) & mask
        s[d] = rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & mask
        s[b] = rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & mask
        s[d] = rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & mask
        s[b] = rotl(s[b] ^ s[c], 7)

    for _ in range(10):
        for column in range(4):
            quarter(column, 4 + column, 8 + column, 12 + column)
        for diagonal in range(4):
            quarter(
                diagonal,
                4 + (diagonal + 1) % 4,
                8 + (diagonal + 2) % 4,
                12 + (diagonal + 3) % 4,
            )
    return struct.pack("<8I", *s[0:4], *s[12:16])


def test_hchacha20_matches_the_rounds_written_out() -> None:
    """The keystream-minus-input-state construction equals the block function without
    feed-forward for any key and nonce, including a counter word of 2**32 - 1."""
    key = bytes(range(32))
    nonce = x("000000090000004a0000000031415927")
    assert _reference_hchacha20(key, nonce) == hchacha20(key, nonce)
    rng = random.Random(14)
    nonces = [b"\xff" * 16, bytes(16), b"\xff\xff\xff\xff" + bytes(12)]
    nonces += [rng.randbytes(16) for _ in range(50)]
    for nonce in nonces:
        key = rng.randbytes(32)
        assert hchacha20(key, nonce) == _reference_hchacha20(key, nonce)


def test_hchacha20_and_xchacha20_refuse_bad_sizes() -> None:
    with pytest.raises(HandshakeError):
        hchacha20(bytes(31), bytes(16))
    with pytest.raises(HandshakeError):
        hchacha20(bytes(32), bytes(12))
    with pytest.raises(HandshakeError):
        xaead_encrypt(bytes(32), bytes(12), b"", b"")
    with pytest.raises(HandshakeError):
        xaead_decrypt(bytes(32), bytes(23), bytes(16), b"")


def test_xchacha20poly1305_is_chacha20poly1305_under_the_subkey() -> None:
    """XChaCha20-Poly1305 (draft section 2.3): subkey = HChaCha20(key, nonce[:16]),
    then the IETF AEAD with nonce 0x00000000 || nonce[16:24]."""
    rng = random.Random(15)
    for size in (0, 1, 16, 32, 100):
        key, nonce, data, ad = rng.randbytes(32), rng.randbytes(24), rng.randbytes(size), b"ad"
        subkey = _reference_hchacha20(key, nonce[:16])
        expected = ChaCha20Poly1305(subkey).encrypt(bytes(4) + nonce[16:], data, ad)
        assert xaead_encrypt(key, nonce, data, ad) == expected
        assert xaead_decrypt(key, nonce, expected, ad) == data


def test_xchacha20poly1305_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 appendix A.3.1
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
        b"for the future, sunscreen would be it."
    )
    aad = x("50515253c0c1c2c3c4c5c6c7")
    key = x("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
    nonce = x("404142434445464748494a4b4c4d4e4f5051525354555657")
    ciphertext = x(
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
        "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
        "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e"
    )
    tag = x("c0875924c1c7987947deafd8780acf49")
    assert xaead_encrypt(key, nonce, plaintext, aad) == ciphertext + tag
    assert xaead_decrypt(key, nonce, ciphertext + tag, aad) == plaintext
    with pytest.raises(HandshakeError):
        xaead_decrypt(key, nonce, ciphertext + bytes(16), aad)


def test_dh_rejects_low_order_points() -> None:
    private = private_key_from_bytes(bytes(range(32)))
    for point in (bytes(32), (1).to_bytes(32, "little")):
        with pytest.raises(HandshakeError):
            dh(private, point)


@pytest.mark.filterwarnings("ignore:One of ephemeral keypairs")
@pytest.mark.parametrize("seed", range(8))
def test_differential_against_noiseprotocol(seed: int) -> None:
    """WireGuard's handshake (prologue = identifier, 12-byte timestamp payload, empty
    response) byte-for-byte against noiseprotocol in both roles."""
    from noise.connection import Keypair, NoiseConnection

    rng = random.Random(seed)
    si, sr, ei, er, psk = (rng.randbytes(32) for _ in range(5))
    stamp = rng.randbytes(12)
    pub_i = public_key_of(private_key_from_bytes(si))
    pub_r = public_key_of(private_key_from_bytes(sr))

    def oracle(initiator: bool) -> NoiseConnection:
        conn = NoiseConnection.from_name(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
        conn.set_as_initiator() if initiator else conn.set_as_responder()
        conn.set_prologue(noise.IDENTIFIER)
        conn.set_psks(psk=psk)
        conn.set_keypair_from_private_bytes(Keypair.STATIC, si if initiator else sr)
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ei if initiator else er)
        if initiator:
            conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, pub_r)
        conn.start_handshake()
        return conn

    oi, orr = oracle(True), oracle(False)
    m1 = oi.write_message(stamp)
    ours = noise.begin(pub_r)
    e, s, p = noise.write_initiation(
        ours, private_key_from_bytes(ei), pub_i, pub_r, dh(private_key_from_bytes(si), pub_r), stamp
    )
    assert e + s + p == m1
    assert orr.read_message(m1) == stamp
    m2 = orr.write_message(b"")
    res = noise.begin(pub_r)
    remote = noise.read_initiation_static(res, private_key_from_bytes(sr), e, s)
    noise.read_initiation_payload(res, dh(private_key_from_bytes(sr), remote), p)
    e2, empty = noise.write_response(res, private_key_from_bytes(er), e, remote, psk, b"")
    assert e2 + empty == m2
    noise.read_response(
        ours, private_key_from_bytes(ei), private_key_from_bytes(si), e2, psk, empty
    )
    oi.read_message(m2)
    assert ours.h == res.h == oi.get_handshake_hash()
    send, _ = ours.split()
    data = rng.randbytes(50)
    assert orr.decrypt(ChaCha20Poly1305(send).encrypt(bytes(12), data, b"")) == data
