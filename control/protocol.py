"""The Control WebSocket protocol (DESIGN.md, "Control protocol"), shared by all sides.

Every frame is a JSON text frame ``{"type": str, "data": object}``; frames from Control
also carry ``"configVersion": int``.  This module turns frames into checked value
objects and back.  Any malformed input raises :class:`ProtocolError` with a stable
``code`` that the hub sends back in an ``error`` frame; nothing else escapes.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from kakuremichi import jsonsafe

MAX_FRAME_BYTES = 1 << 20
AUTH_TIMEOUT = 5.0
HEARTBEAT_INTERVAL = 30.0

CLIENT_TYPES = ("agent", "gateway")
HEALTH_STATES = ("healthy", "unhealthy", "unknown")

# Close codes (RFC 6455 §7.4.2: 4000-4999 are for applications).
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_AUTH_FAILED = 4001
CLOSE_AUTH_TIMEOUT = 4002
CLOSE_REPLACED = 4003
CLOSE_REVOKED = 4004
CLOSE_HEARTBEAT_TIMEOUT = 4005
CLOSE_TOO_SLOW = 4006
CLOSE_BAD_FRAMES = 4007


class ProtocolError(Exception):
    """A frame that does not follow the protocol; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    type: str
    data: dict[str, Any]
    config_version: int | None = None


@dataclass(frozen=True)
class Auth:
    """``auth`` from a client: who it is and how to reach it."""

    api_key: str
    client_type: str
    public_key: str
    version: str
    public_ip: str | None = None
    wireguard_port: int | None = None


@dataclass(frozen=True)
class Heartbeat:
    """``heartbeat``: liveness plus the config version the client holds."""

    timestamp: float
    config_version: int


@dataclass(frozen=True)
class TunnelHealth:
    """One entry of an agent's ``status``."""

    tunnel_id: str
    health: str
    detail: str


@dataclass(frozen=True)
class CertificateObtained:
    """``certificate_obtained`` from a gateway that completed ACME for a domain."""

    domain: str
    certificate: str
    private_key: str
    not_after: float


def encode(type_: str, data: object, config_version: int | None = None) -> str:
    frame: dict[str, Any] = {"type": type_, "data": data}
    if config_version is not None:
        frame["configVersion"] = config_version
    return json.dumps(frame, separators=(",", ":"))


def decode(text: str | bytes) -> Frame:
    if isinstance(text, bytes):
        raise ProtocolError("binary_frame", "frames must be JSON text frames")
    if len(text) > MAX_FRAME_BYTES:
        raise ProtocolError("frame_too_large", f"frame exceeds {MAX_FRAME_BYTES} bytes")
    try:
        value = jsonsafe.loads(text)
    except jsonsafe.JsonError as exc:
        raise ProtocolError("malformed_json", f"frame is {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("malformed_frame", "frame must be a JSON object")
    type_ = value.get("type")
    if not isinstance(type_, str) or not type_:
        raise ProtocolError("malformed_frame", "frame needs a string 'type'")
    data = value.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError("malformed_frame", "'data' must be a JSON object")
    version = value.get("configVersion")
    if version is not None and (
        not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= 2**62
    ):
        raise ProtocolError("malformed_frame", "'configVersion' must be an integer in 0..2**62")
    return Frame(type_, data, version)


def _str(data: dict[str, Any], key: str, *, max_len: int = 256, optional: bool = False) -> str:
    value = data.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ProtocolError("invalid_field", f"'{key}' must be a string")
    if len(value) > max_len:
        raise ProtocolError("invalid_field", f"'{key}' is longer than {max_len} characters")
    if not value.isascii():
        try:  # a JSON escape can write a lone surrogate, which no database or log takes
            value.encode()
        except UnicodeEncodeError:
            raise ProtocolError("invalid_field", f"'{key}' is not valid Unicode") from None
    return value


def _int(data: dict[str, Any], key: str, low: int, high: int) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError("invalid_field", f"'{key}' must be an integer in {low}..{high}")
    return value


def _number(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError("invalid_field", f"'{key}' must be a number")
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ProtocolError("invalid_field", f"'{key}' must be finite")
    return number


def check_public_key(text: str) -> str:
    """A WireGuard public key: standard base64 of exactly 32 bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("invalid_field", "'publicKey' is not valid base64") from exc
    if len(raw) != 32:
        raise ProtocolError("invalid_field", "'publicKey' must encode 32 bytes")
    return base64.b64encode(raw).decode()


def parse_auth(data: dict[str, Any]) -> Auth:
    api_key = _str(data, "apiKey", max_len=128)
    client_type = _str(data, "clientType", max_len=16)
    if client_type not in CLIENT_TYPES:
        raise ProtocolError("invalid_field", "'clientType' must be 'agent' or 'gateway'")
    public_key = check_public_key(_str(data, "publicKey", max_len=64))
    version = _str(data, "version", max_len=64, optional=True)
    if client_type == "agent":
        return Auth(api_key, client_type, public_key, version)
    public_ip = _str(data, "publicIp", max_len=64)
    try:
        public_ip = str(ipaddress.ip_address(public_ip))
    except ValueError as exc:
        raise ProtocolError("invalid_field", "'publicIp' must be an IP address") from exc
    port = _int(data, "wireguardPort", 1, 65535)
    return Auth(api_key, client_type, public_key, version, public_ip, port)


def parse_heartbeat(data: dict[str, Any]) -> Heartbeat:
    return Heartbeat(_number(data, "timestamp"), _int(data, "configVersion", 0, 2**62))


def parse_status(data: dict[str, Any]) -> list[TunnelHealth]:
    entries = data.get("tunnels")
    if not isinstance(entries, list) or len(entries) > 10_000:
        raise ProtocolError("invalid_field", "'tunnels' must be a list of at most 10000")
    result = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProtocolError("invalid_field", "each status entry must be an object")
        health = _str(entry, "health", max_len=16)
        if health not in HEALTH_STATES:
            raise ProtocolError("invalid_field", f"'health' must be one of {HEALTH_STATES}")
        result.append(
            TunnelHealth(
                _str(entry, "tunnelId", max_len=36),
                health,
                _str(entry, "detail", max_len=512, optional=True),
            )
        )
    return result


def parse_certificate_obtained(data: dict[str, Any]) -> CertificateObtained:
    domain = _str(data, "domain", max_len=253).lower()
    certificate = _str(data, "certificate", max_len=64 * 1024)
    private_key = _str(data, "privateKey", max_len=16 * 1024)
    if "-----BEGIN CERTIFICATE-----" not in certificate:
        raise ProtocolError("invalid_field", "'certificate' must be a PEM chain")
    if "PRIVATE KEY-----" not in private_key:
        raise ProtocolError("invalid_field", "'privateKey' must be a PEM private key")
    return CertificateObtained(domain, certificate, private_key, _number(data, "notAfter"))
