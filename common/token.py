"""One enrollment token: Control's URL, an API key and Control's certificate pin.

Theory of operation
-------------------
``kakuremichi agent --token T`` (and ``gateway --token T``) joins with one pasted
string, as cloudflared's ``--token`` does.  ``T`` is ``kmt_`` followed by the
unpadded base64url encoding of a small JSON object::

    {"v": 1, "u": "https://control.example.com", "k": "agt_…", "p": "<pin>"}

``u`` is Control's URL, ``k`` the agent's or gateway's API key, and ``p`` (optional)
the SHA-256 of the DER ``SubjectPublicKeyInfo`` of Control's certificate, in
unpadded base64url (the HPKP / ``curl --pinnedpubkey`` form).  With a pin the client
trusts exactly that key: the certificate chain and name are not checked against a
CA, so a self-signed Control works, and a Control presenting any other key is
refused before the API key is sent.  The pin is of the key, not of the whole
certificate, so a renewal that keeps the key (Control's own ACME renewals and its
generated certificate do) keeps every token valid.

The token is a secret (it holds the API key): it is a ``secret`` setting (flag,
``KAKUREMICHI_TOKEN``, ``KAKUREMICHI_TOKEN_FILE``, config key), log redaction knows
its ``kmt_`` prefix, and error messages about a bad token never quote it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

PREFIX = "kmt_"
VERSION = 1
#: a token is a few hundred bytes; anything far larger is not one
MAX_TOKEN = 4096
PIN_BYTES = 32


class TokenError(ValueError):
    """The text is not a usable enrollment token; the message never quotes it."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def spki_pin(certificate: x509.Certificate) -> str:
    """The pin of a certificate: SHA-256 of its DER SubjectPublicKeyInfo, base64url."""
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _b64encode(hashlib.sha256(spki).digest())


def spki_pin_of_der(der: bytes) -> str:
    """:func:`spki_pin` of a DER certificate (as ``SSLObject.getpeercert(True)`` gives)."""
    return spki_pin(x509.load_der_x509_certificate(der))


def valid_pin(pin: str) -> bool:
    try:
        return len(pin) == 43 and len(_b64decode(pin)) == PIN_BYTES
    except (binascii.Error, ValueError):
        return False


@dataclass(frozen=True)
class EnrollmentToken:
    """What a token carries (see the module docstring)."""

    control_url: str
    api_key: str
    pin: str | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.control_url)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
            raise TokenError("the token's Control URL is not an http(s):// URL")
        if not self.api_key.startswith(("agt_", "gtw_")) or len(self.api_key) > 256:
            raise TokenError("the token holds no agent (agt_) or gateway (gtw_) key")
        if self.pin is not None and not valid_pin(self.pin):
            raise TokenError("the token's certificate pin is not a SHA-256 in base64url")

    @property
    def kind(self) -> str:
        """``agent`` or ``gateway``, from the key's prefix."""
        return "agent" if self.api_key.startswith("agt_") else "gateway"

    def encode(self) -> str:
        body: dict[str, object] = {"v": VERSION, "u": self.control_url, "k": self.api_key}
        if self.pin is not None:
            body["p"] = self.pin
        return PREFIX + _b64encode(json.dumps(body, separators=(",", ":")).encode())

    def __repr__(self) -> str:  # never the key
        return f"EnrollmentToken(control_url={self.control_url!r}, pin={self.pin!r})"


def decode(text: str) -> EnrollmentToken:
    """Parse a token; :class:`TokenError` (naming what is wrong, never the token) if bad."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise TokenError(f"not an enrollment token (it starts with {PREFIX})")
    if len(text) > MAX_TOKEN:
        raise TokenError(f"longer than {MAX_TOKEN} characters; not an enrollment token")
    try:
        data = json.loads(_b64decode(text[len(PREFIX) :]))
    except (binascii.Error, ValueError):
        raise TokenError("damaged (not base64url JSON); copy it again whole") from None
    if not isinstance(data, dict):
        raise TokenError("damaged (not a JSON object); copy it again whole")
    if data.get("v") != VERSION:
        raise TokenError(f"token version {str(data.get('v'))[:8]!r} is not supported (want 1)")
    url, key, pin = data.get("u"), data.get("k"), data.get("p")
    if not isinstance(url, str) or not isinstance(key, str):
        raise TokenError("damaged (Control URL or key missing); copy it again whole")
    if pin is not None and not isinstance(pin, str):
        raise TokenError("damaged (certificate pin is not text); copy it again whole")
    return EnrollmentToken(url, key, pin)
