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

from common import jsonsafe

MAX_FRAME_BYTES = 1 << 20
AUTH_TIMEOUT = 5.0
HEARTBEAT_INTERVAL = 30.0

CLIENT_TYPES = ("agent", "gateway")
HEALTH_STATES = ("healthy", "unhealthy", "unknown")

# Close codes (RFC 6455 §7.4.2: 4000-4999 are for applications).
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
#: Control is busy (a reconnect storm: its admission queue is full): come back after
#: the seconds its reason names ("retry after N"), with jitter (RFC 6455's registry:
#: 1013 Try Again Later)
CLOSE_TRY_AGAIN = 1013
#: longest wait a ``CLOSE_TRY_AGAIN`` reason may ask for (seconds)
MAX_RETRY_AFTER = 300
CLOSE_AUTH_FAILED = 4001
CLOSE_AUTH_TIMEOUT = 4002
CLOSE_REPLACED = 4003
CLOSE_REVOKED = 4004
CLOSE_HEARTBEAT_TIMEOUT = 4005
CLOSE_TOO_SLOW = 4006
CLOSE_BAD_FRAMES = 4007
#: an admin disabled this agent or gateway: its key stays valid, and it is let in again
#: once enabled (its ``auth`` is answered ``auth_error`` with code ``disabled`` until then)
CLOSE_DISABLED = 4008
#: the ``auth_error`` code of a disabled agent or gateway
AUTH_DISABLED = "disabled"


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
    #: the gateway's HTTPS port, where agents whose UDP is blocked reach its WireGuard
    #: over a WebSocket (None: HTTPS off, no stream transport)
    https_port: int | None = None

    def to_wire(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "apiKey": self.api_key,
            "clientType": self.client_type,
            "publicKey": self.public_key,
            "version": self.version,
        }
        if self.client_type == "gateway":
            data["publicIp"] = self.public_ip
            data["wireguardPort"] = self.wireguard_port
            data["httpsPort"] = self.https_port
        return data

    def __repr__(self) -> str:  # never the API key, in a log or a traceback
        return f"Auth(client_type={self.client_type!r}, public_key={self.public_key!r})"


@dataclass(frozen=True)
class Heartbeat:
    """``heartbeat``: liveness plus the config version the client holds."""

    timestamp: float
    config_version: int

    def to_wire(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "configVersion": self.config_version}


@dataclass(frozen=True)
class TunnelHealth:
    """One entry of an agent's ``status``."""

    tunnel_id: str
    health: str
    detail: str


def status_wire(entries: list[TunnelHealth]) -> dict[str, Any]:
    """``status`` from an agent: the health of each of its tunnels' local targets."""
    return {
        "tunnels": [
            {"tunnelId": e.tunnel_id, "health": e.health, "detail": e.detail} for e in entries
        ]
    }


@dataclass(frozen=True)
class CertificateObtained:
    """``certificate_obtained`` from a gateway that completed ACME for a domain."""

    domain: str
    certificate: str
    private_key: str
    not_after: float
    #: the lease (``acme_order``) it was ordered under; None from an older gateway
    lease: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "certificate": self.certificate,
            "privateKey": self.private_key,
            "notAfter": self.not_after,
            "lease": self.lease,
        }

    def __repr__(self) -> str:  # never the key, in a log or a traceback
        return f"CertificateObtained(domain={self.domain!r}, not_after={self.not_after})"


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
    except jsonsafe.JsonNumberError as exc:  # well-formed, but no field holds that number
        raise ProtocolError("invalid_field", f"frame field {exc}") from None
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
    https_port = None if data.get("httpsPort") is None else _int(data, "httpsPort", 1, 65535)
    return Auth(api_key, client_type, public_key, version, public_ip, port, https_port)


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


#: how often gateways and agents send ``stats`` (seconds)
STATS_INTERVAL = 10.0
#: the transports a ``stats`` peer may name (WireGuard over UDP, or over the stream)
PEER_TRANSPORTS = ("udp", "tcp")
#: bounds of one ``stats`` frame
MAX_STATS_ENTRIES = 10_000
MAX_COUNT = 2**53


@dataclass(frozen=True, slots=True)
class TunnelTraffic:
    """One tunnel's traffic since the previous ``stats`` (counts, not totals)."""

    tunnel_id: str
    requests: int  # HTTP requests answered, or raw TCP connections / UDP flows opened
    errors: int  # 5xx answers and failures reaching the agent
    bytes_in: int  # from clients
    bytes_out: int  # to clients

    def to_wire(self) -> dict[str, Any]:
        return {
            "tunnelId": self.tunnel_id,
            "requests": self.requests,
            "errors": self.errors,
            "bytesIn": self.bytes_in,
            "bytesOut": self.bytes_out,
        }


@dataclass(frozen=True, slots=True)
class PeerHandshake:
    """A WireGuard peer (by public key) and the age of its last handshake."""

    public_key: str
    handshake_age: float | None  # seconds; None: never
    #: the path its datagrams take: "udp", or "tcp" (the stream transport, UDP blocked);
    #: None: not said (an older sender)
    transport: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "publicKey": self.public_key,
            "handshakeAge": self.handshake_age,
            "transport": self.transport,
        }


@dataclass(frozen=True, slots=True)
class Stats:
    """``stats`` from a gateway or an agent, every ``STATS_INTERVAL``: per-tunnel traffic
    since the previous one (a gateway's: it sees every request; an agent sends none, its
    counts of the same connections would double them) and its WireGuard peers'
    handshake ages."""

    tunnels: tuple[TunnelTraffic, ...]
    peers: tuple[PeerHandshake, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "tunnels": [t.to_wire() for t in self.tunnels],
            "peers": [p.to_wire() for p in self.peers],
        }


def _entries(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list) or len(value) > MAX_STATS_ENTRIES:
        raise ProtocolError(
            "invalid_field", f"'{key}' must be a list of at most {MAX_STATS_ENTRIES}"
        )
    return value


def parse_stats(data: dict[str, Any]) -> Stats:
    tunnels = []
    for entry in _entries(data, "tunnels"):
        item = _object(entry, "a tunnel's traffic")
        tunnels.append(
            TunnelTraffic(
                _str(item, "tunnelId", max_len=MAX_ID),
                _int(item, "requests", 0, MAX_COUNT),
                _int(item, "errors", 0, MAX_COUNT),
                _int(item, "bytesIn", 0, MAX_COUNT),
                _int(item, "bytesOut", 0, MAX_COUNT),
            )
        )
    peers = []
    for entry in _entries(data, "peers"):
        item = _object(entry, "a peer")
        age = None
        if item.get("handshakeAge") is not None:
            age = _number(item, "handshakeAge")
            if age < 0:
                raise ProtocolError("invalid_field", "'handshakeAge' must be >= 0")
        transport = None
        if item.get("transport") is not None:
            transport = _str(item, "transport", max_len=8)
            if transport not in PEER_TRANSPORTS:
                raise ProtocolError(
                    "invalid_field", f"'transport' must be one of {PEER_TRANSPORTS}"
                )
        key = check_public_key(_str(item, "publicKey", max_len=64))
        peers.append(PeerHandshake(key, age, transport))
    return Stats(tuple(tunnels), tuple(peers))


@dataclass(frozen=True, slots=True)
class ShareLinkUsed:
    """``share_link_used`` from a gateway: a share link opened a session (Control
    counts the uses of a link that has a limit)."""

    tunnel_id: str
    link_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"tunnelId": self.tunnel_id, "linkId": self.link_id}


def parse_share_link_used(data: dict[str, Any]) -> ShareLinkUsed:
    return ShareLinkUsed(_str(data, "tunnelId", max_len=64), _str(data, "linkId", max_len=64))


def parse_certificate_obtained(data: dict[str, Any]) -> CertificateObtained:
    domain = _str(data, "domain", max_len=253).lower()
    certificate = _str(data, "certificate", max_len=64 * 1024)
    private_key = _str(data, "privateKey", max_len=16 * 1024)
    if "-----BEGIN CERTIFICATE-----" not in certificate:
        raise ProtocolError("invalid_field", "'certificate' must be a PEM chain")
    if "PRIVATE KEY-----" not in private_key:
        raise ProtocolError("invalid_field", "'privateKey' must be a PEM private key")
    lease = None if data.get("lease") is None else _str(data, "lease", max_len=MAX_ID)
    return CertificateObtained(domain, certificate, private_key, _number(data, "notAfter"), lease)


# -- shared ACME (issue 17): gateways order certificates under a lease from Control ------
#
# gateway → Control: ``acme_ready`` (after each auth: the challenges it can answer),
# ``acme_challenge`` / ``acme_withdraw`` (an HTTP-01 response of its order, for every
# gateway to serve), ``acme_challenges_applied`` (it serves the set numbered
# ``serial``), ``acme_failed`` (its order failed), ``certificate_obtained`` (above).
# Control → gateway: ``acme_order`` (a lease: order these names), ``acme_challenges``
# (every pending HTTP-01 response, numbered), ``acme_published`` (a response reached
# every gateway: tell the CA to validate).  These frames carry no ``configVersion``:
# they change nothing of the configuration a heartbeat compares.

ACME_CHALLENGE_TYPES = ("http-01", "dns-01")
MAX_ACME_NAMES = 100
MAX_ACME_TOKEN = 128
MAX_ACME_CHALLENGES = 1000


def _acme_token(data: dict[str, Any], key: str) -> str:
    """An ACME token (base64url, RFC 8555 §8.1) or key authorisation (token.thumbprint)."""
    text = _str(data, key, max_len=2 * MAX_ACME_TOKEN + 1)
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    if not text or not set(text) <= allowed:
        raise ProtocolError("invalid_field", f"'{key}' must be base64url")
    return text


@dataclass(frozen=True, slots=True)
class AcmeReady:
    """``acme_ready``: a gateway orders certificates; what it can prove names with
    (``dns-01`` only under ``dns_zones``)."""

    challenges: tuple[str, ...]
    dns_zones: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"challenges": list(self.challenges), "dnsZones": list(self.dns_zones)}


def parse_acme_ready(data: dict[str, Any]) -> AcmeReady:
    kinds = _strings(data, "challenges", max_len=16)
    if not set(kinds) <= set(ACME_CHALLENGE_TYPES):
        raise ProtocolError("invalid_field", f"'challenges' must be of {ACME_CHALLENGE_TYPES}")
    zones = tuple(_domain({"z": z}, "z") for z in _strings(data, "dnsZones", max_len=MAX_DOMAIN))
    return AcmeReady(tuple(dict.fromkeys(kinds)), zones)


@dataclass(frozen=True, slots=True)
class AcmeOrder:
    """``acme_order``: Control leases ``names`` to this gateway for ``ttl`` seconds;
    the certificate goes back as ``certificate_obtained`` under ``domain`` (the
    tunnel domain or ``*.parent`` it is for)."""

    lease: str
    domain: str
    names: tuple[str, ...]
    ttl: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "lease": self.lease,
            "domain": self.domain,
            "names": list(self.names),
            "ttl": self.ttl,
        }


def parse_acme_order(data: dict[str, Any]) -> AcmeOrder:
    names = _strings(data, "names", max_len=MAX_DOMAIN)
    if not names or len(names) > MAX_ACME_NAMES:
        raise ProtocolError("invalid_field", f"'names' must hold 1..{MAX_ACME_NAMES} names")
    ttl = _number(data, "ttl")
    if not 1 <= ttl <= 86400:
        raise ProtocolError("invalid_field", "'ttl' must be in 1..86400 seconds")
    lease = _str(data, "lease", max_len=MAX_ID)
    if not lease:
        raise ProtocolError("invalid_field", "'lease' must not be empty")
    return AcmeOrder(
        lease, _domain(data, "domain"), tuple(_domain({"n": n}, "n") for n in names), ttl
    )


@dataclass(frozen=True, slots=True)
class AcmeChallenge:
    """``acme_challenge`` (publish) and ``acme_withdraw`` (the order no longer needs
    it): an HTTP-01 token and its key authorisation, under a lease."""

    lease: str
    token: str
    key_authorization: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {
            "lease": self.lease,
            "token": self.token,
            "keyAuthorization": self.key_authorization,
        }


def parse_acme_challenge(data: dict[str, Any], *, withdraw: bool = False) -> AcmeChallenge:
    token = _acme_token(data, "token")
    if len(token) > MAX_ACME_TOKEN or "." in token:
        raise ProtocolError("invalid_field", "'token' must be base64url")
    authorization = "" if withdraw else _acme_token(data, "keyAuthorization")
    if authorization and not authorization.startswith(token + "."):
        raise ProtocolError("invalid_field", "'keyAuthorization' must be the token's")
    return AcmeChallenge(_str(data, "lease", max_len=MAX_ID), token, authorization)


@dataclass(frozen=True, slots=True)
class AcmeChallenges:
    """``acme_challenges``: every pending HTTP-01 response (token → key authorisation),
    the set numbered ``serial`` (it only grows); a gateway serves exactly these (plus
    its own order's, until Control has them) and answers ``acme_challenges_applied``."""

    serial: int
    challenges: tuple[tuple[str, str], ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "challenges": [{"token": t, "keyAuthorization": k} for t, k in self.challenges],
        }


def parse_acme_challenges(data: dict[str, Any]) -> AcmeChallenges:
    values = data.get("challenges")
    if not isinstance(values, list) or len(values) > MAX_ACME_CHALLENGES:
        raise ProtocolError(
            "invalid_field", f"'challenges' must be a list of at most {MAX_ACME_CHALLENGES}"
        )
    pairs = []
    for value in values:
        item = parse_acme_challenge({"lease": "", **_object(value, "a challenge")})
        pairs.append((item.token, item.key_authorization))
    return AcmeChallenges(_int(data, "serial", 0, 2**62), tuple(pairs))


def parse_acme_serial(data: dict[str, Any]) -> int:
    """``acme_challenges_applied``: the serial of the set a gateway now serves."""
    return _int(data, "serial", 0, 2**62)


@dataclass(frozen=True, slots=True)
class AcmePublished:
    """``acme_published``: the token reached every gateway; the CA may validate."""

    lease: str
    token: str

    def to_wire(self) -> dict[str, Any]:
        return {"lease": self.lease, "token": self.token}


def parse_acme_published(data: dict[str, Any]) -> AcmePublished:
    return AcmePublished(_str(data, "lease", max_len=MAX_ID), _acme_token(data, "token"))


@dataclass(frozen=True, slots=True)
class AcmeFailed:
    """``acme_failed``: the order under ``lease`` failed, and why (safe to show)."""

    lease: str
    error: str

    def to_wire(self) -> dict[str, Any]:
        return {"lease": self.lease, "error": self.error}


def parse_acme_failed(data: dict[str, Any]) -> AcmeFailed:
    return AcmeFailed(
        _str(data, "lease", max_len=MAX_ID), _str(data, "error", max_len=512, optional=True)
    )


# -- Control → client -------------------------------------------------------------------
#
# Control builds these from its rows (``control/ws/configs.py``) and sends ``to_wire()``;
# each client parses a frame once, here, into the same values.  A message that does not
# parse, in any part, is refused whole (ProtocolError): the client keeps its last good
# view rather than a partial one.

TUNNEL_PROTOCOLS = ("http", "tcp", "udp")
#: the PROXY protocol versions a raw tunnel may send its target (version 1 has no UDP)
PROXY_PROTOCOLS: dict[str, tuple[str, ...]] = {"tcp": ("v1", "v2"), "udp": ("v2",)}


def proxy_protocol_problem(protocol: str, value: object) -> str:
    """Why ``value`` cannot be the ``proxyProtocol`` of a ``protocol`` tunnel ("" when
    it can): null, or a version that tunnel's protocol has (Control's API and the
    tunnels it sends follow this one rule)."""
    if value is None:
        return ""
    allowed = PROXY_PROTOCOLS.get(protocol, ())
    if isinstance(value, str) and value in allowed:
        return ""
    if not allowed:
        return f"proxyProtocol is for tcp and udp tunnels; a {protocol} tunnel takes null"
    if protocol == "udp" and value == "v1":
        return "PROXY protocol v1 has no UDP form: a udp tunnel takes v2 or null"
    return f"proxyProtocol of a {protocol} tunnel is " + ", ".join(allowed) + " or null"


MAX_ENTRIES = 100_000  # tunnels, peers or certificates in one config
MAX_ID = 64
MAX_NAME = 256
MAX_TARGET = 2048
MAX_DOMAIN = 253


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError("invalid_field", f"{what} must be an object")
    return value


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list) or len(value) > MAX_ENTRIES:
        raise ProtocolError("invalid_field", f"'{key}' must be a list of at most {MAX_ENTRIES}")
    return value


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    if not isinstance(value, bool):
        raise ProtocolError("invalid_field", f"'{key}' must be true or false")
    return value


def _ip(data: dict[str, Any], key: str) -> str:
    text = _str(data, key, max_len=64)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ProtocolError("invalid_field", f"'{key}' must be an IP address") from None


def _prefixes(data: dict[str, Any], key: str, *, interface: bool = False) -> tuple[str, ...]:
    values = _list(data, key)
    result = []
    for value in values:
        if not isinstance(value, str) or len(value) > 64:
            raise ProtocolError("invalid_field", f"'{key}' must hold IP prefixes")
        try:
            parsed = ipaddress.ip_interface(value) if interface else ipaddress.ip_network(value)
        except ValueError:
            raise ProtocolError("invalid_field", f"'{key}' holds {value[:64]!r}") from None
        result.append(str(parsed))
    return tuple(result)


def _optional_int(data: dict[str, Any], key: str, low: int, high: int) -> int | None:
    return None if data.get(key) is None else _int(data, key, low, high)


def check_endpoint(text: str) -> tuple[str, int]:
    """``ip:port`` or ``[v6]:port`` → (ip, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProtocolError("invalid_field", f"endpoint {text[:64]!r} is not ip:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        raise ProtocolError("invalid_field", f"endpoint {text[:64]!r} is not ip:port") from None


def _domain(data: dict[str, Any], key: str) -> str:
    """A host name as the router matches it: lower case, no trailing dot, ASCII (IDNs
    arrive as A-labels), at most 253 characters."""
    text = _str(data, key, max_len=MAX_DOMAIN + 1).lower().rstrip(".")
    if not text or len(text) > MAX_DOMAIN or not text.isascii() or ":" in text:
        raise ProtocolError("invalid_field", f"'{key}' must be a host name")
    if any(c.isspace() or c in "/?#@[]\\" for c in text):
        raise ProtocolError("invalid_field", f"'{key}' must be a host name")
    return text


#: replicas of one tunnel (issue 17): how a gateway spreads requests and connections
BALANCE_MODES = ("round_robin", "least_connections")
#: sticky sessions: by a cookie the gateway sets (http only) or by the client's address
STICKY_MODES = ("cookie", "client_ip")
REPLICA_ROLES = ("active", "standby")
#: a replica's health as Control knows it: its agent's target check, or ``offline``
#: while the agent is not connected to Control
REPLICA_HEALTH = ("healthy", "unhealthy", "unknown", "offline")
MAX_REPLICAS = 64
MAX_WEIGHT = 1000


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """One agent serving a tunnel (a tunnel with two or more has them all here)."""

    agent_id: str
    agent_ip: str
    #: share of new requests/connections relative to the other replicas (1..1000)
    weight: int = 1
    #: "standby" replicas take traffic only while no active one is healthy
    role: str = "active"
    #: taken out by an operator: no new requests or connections, open ones finish
    draining: bool = False
    health: str = "unknown"

    def to_wire(self) -> dict[str, Any]:
        return {
            "agentId": self.agent_id,
            "agentIp": self.agent_ip,
            "weight": self.weight,
            "role": self.role,
            "draining": self.draining,
            "health": self.health,
        }


def _replica(value: object) -> ReplicaSpec:
    data = _object(value, "a replica")
    agent_id = _str(data, "agentId", max_len=MAX_ID)
    if not agent_id:
        raise ProtocolError("invalid_field", "'agentId' of a replica must not be empty")
    role = data.get("role", "active")
    if role not in REPLICA_ROLES:
        raise ProtocolError("invalid_field", f"'role' must be one of {REPLICA_ROLES}")
    health = data.get("health", "unknown")
    if health not in REPLICA_HEALTH:
        raise ProtocolError("invalid_field", f"'health' must be one of {REPLICA_HEALTH}")
    draining = data.get("draining", False)
    if not isinstance(draining, bool):
        raise ProtocolError("invalid_field", "'draining' must be true or false")
    weight = 1 if data.get("weight") is None else _int(data, "weight", 1, MAX_WEIGHT)
    return ReplicaSpec(agent_id, _ip(data, "agentIp"), weight, role, draining, health)


def _replicas(data: dict[str, Any], agent_id: str) -> tuple[ReplicaSpec, ...]:
    """A tunnel's ``replicas`` (absent from an older Control, and for a tunnel with one
    agent: empty): each agent once, the tunnel's ``agentId`` among them."""
    values = data.get("replicas")
    if values is None:
        return ()
    if not isinstance(values, list) or len(values) > MAX_REPLICAS:
        raise ProtocolError("invalid_field", f"'replicas' must be a list of at most {MAX_REPLICAS}")
    replicas = tuple(_replica(v) for v in values)
    ids = [r.agent_id for r in replicas]
    if len(set(ids)) != len(ids):
        raise ProtocolError("invalid_field", "'replicas' names an agent twice")
    if replicas and agent_id not in ids:
        raise ProtocolError("invalid_field", "'replicas' must include the tunnel's 'agentId'")
    return replicas


def sticky_problem(protocol: str, value: object) -> str:
    """Why ``value`` cannot be a ``protocol`` tunnel's ``sticky`` ("" when it can)."""
    if value is None or value == "client_ip":
        return ""
    if value == "cookie":
        return "" if protocol == "http" else "a raw tunnel has no cookies: sticky is client_ip"
    return "sticky is cookie, client_ip or null"


@dataclass(frozen=True, slots=True)
class TunnelSpec:
    """One tunnel as Control describes it (``config`` and ``tunnel_create/update``)."""

    id: str
    protocol: str  # http | tcp | udp
    domain: str | None  # http tunnels
    public_port: int | None  # tcp / udp tunnels
    target: str  # host:port or an http(s):// URL, on the agent's side
    agent_id: str
    agent_ip: str
    enabled: bool
    #: tcp/udp tunnels: the PROXY protocol header the agent sends its target first
    #: ("v1", "v2"; udp: "v2" only), None for none.  Absent from an older Control: None.
    #: Gateways and agents both read it (common/relay/tcp.py says what happens while a
    #: change has reached one of them and not yet the other).
    proxy_protocol: str | None = None
    #: two or more agents serving the tunnel (``agent_id`` is one of them, the one an
    #: older gateway routes to); empty for a tunnel with one agent and from an older
    #: Control.  Sent (with ``balance`` and ``sticky``) only when there are replicas, so
    #: a single-agent tunnel's frame is what it always was.
    replicas: tuple[ReplicaSpec, ...] = ()
    balance: str = "round_robin"
    sticky: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "id": self.id,
            "protocol": self.protocol,
            "domain": self.domain,
            "publicPort": self.public_port,
            "target": self.target,
            "agentId": self.agent_id,
            "agentIp": self.agent_ip,
            "enabled": self.enabled,
            "proxyProtocol": self.proxy_protocol,
        }
        if self.replicas or self.balance != "round_robin" or self.sticky is not None:
            wire["replicas"] = [r.to_wire() for r in self.replicas]
            wire["balance"] = self.balance
            wire["sticky"] = self.sticky
        return wire


def parse_tunnel(value: object) -> TunnelSpec:
    data = _object(value, "a tunnel")
    tunnel_id = _str(data, "id", max_len=MAX_ID)
    if not tunnel_id:
        raise ProtocolError("invalid_field", "'id' must not be empty")
    protocol = _str(data, "protocol", max_len=8)
    if protocol not in TUNNEL_PROTOCOLS:
        raise ProtocolError("invalid_field", f"'protocol' must be one of {TUNNEL_PROTOCOLS}")
    if protocol == "http":
        domain: str | None = _domain(data, "domain")
        public_port = None
    else:
        domain = None
        public_port = _int(data, "publicPort", 1, 65535)
    proxy_protocol = data.get("proxyProtocol")
    problem = proxy_protocol_problem(protocol, proxy_protocol)
    if problem:
        raise ProtocolError("invalid_field", f"'proxyProtocol': {problem}")
    agent_id = _str(data, "agentId", max_len=MAX_ID)
    balance = data.get("balance")
    if balance is None:
        balance = "round_robin"
    elif balance not in BALANCE_MODES:
        raise ProtocolError("invalid_field", f"'balance' must be one of {BALANCE_MODES}")
    sticky = data.get("sticky")
    problem = sticky_problem(protocol, sticky)
    if problem:
        raise ProtocolError("invalid_field", f"'sticky': {problem}")
    return TunnelSpec(
        tunnel_id,
        protocol,
        domain,
        public_port,
        _str(data, "target", max_len=MAX_TARGET),
        agent_id,
        _ip(data, "agentIp"),
        _bool(data, "enabled"),
        proxy_protocol,
        _replicas(data, agent_id),
        balance,
        sticky,
    )


@dataclass(frozen=True, slots=True)
class TunnelDelete:
    """``tunnel_delete``: the tunnel's id and the agent that owned it."""

    id: str
    agent_id: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "agentId": self.agent_id}


def parse_tunnel_delete(value: object) -> TunnelDelete:
    data = _object(value, "'data'")
    tunnel_id = _str(data, "id", max_len=MAX_ID)
    if not tunnel_id:
        raise ProtocolError("invalid_field", "'id' must not be empty")
    return TunnelDelete(tunnel_id, _str(data, "agentId", max_len=MAX_ID, optional=True))


@dataclass(frozen=True, slots=True)
class AgentSelf:
    """An agent's own entry in its config."""

    id: str
    name: str
    subnet: str
    virtual_ip: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "subnet": self.subnet,
            "virtualIp": self.virtual_ip,
        }


@dataclass(frozen=True, slots=True)
class GatewayPeerSpec:
    """A gateway as an agent's WireGuard peer."""

    id: str
    name: str
    public_key: str
    endpoint: str | None  # ip:port, [v6]:port; None until the gateway has reported one
    virtual_ip: str
    allowed_ips: tuple[str, ...]
    #: ip:port of the gateway's HTTPS listener, for WireGuard over a WebSocket when UDP
    #: is blocked (None: the gateway offers no stream transport)
    stream_endpoint: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "publicKey": self.public_key,
            "endpoint": self.endpoint,
            "virtualIp": self.virtual_ip,
            "allowedIps": list(self.allowed_ips),
            "streamEndpoint": self.stream_endpoint,
        }


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """``config`` for an agent: itself, the gateways to peer with, its own tunnels."""

    agent: AgentSelf
    gateways: tuple[GatewayPeerSpec, ...]
    tunnels: tuple[TunnelSpec, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "agent": self.agent.to_wire(),
            "gateways": [g.to_wire() for g in self.gateways],
            "tunnels": [t.to_wire() for t in self.tunnels],
        }


def _subnet(data: dict[str, Any], key: str) -> str:
    text = _str(data, key, max_len=64)
    try:
        return str(ipaddress.ip_network(text))
    except ValueError:
        raise ProtocolError("invalid_field", f"'{key}' must be an IP network") from None


def _gateway_peer(value: object) -> GatewayPeerSpec:
    data = _object(value, "a gateway")
    endpoint = data.get("endpoint")
    if endpoint is not None:
        endpoint = _str(data, "endpoint", max_len=64)
        check_endpoint(endpoint)
    stream = data.get("streamEndpoint")
    if stream is not None:
        stream = _str(data, "streamEndpoint", max_len=64)
        check_endpoint(stream)
    return GatewayPeerSpec(
        _str(data, "id", max_len=MAX_ID),
        _str(data, "name", max_len=MAX_NAME),
        check_public_key(_str(data, "publicKey", max_len=64)),
        endpoint,
        _ip(data, "virtualIp"),
        _prefixes(data, "allowedIps"),
        stream,
    )


def parse_agent_config(value: object) -> AgentConfig:
    data = _object(value, "'data'")
    me = _object(data.get("agent"), "'agent'")
    return AgentConfig(
        AgentSelf(
            _str(me, "id", max_len=MAX_ID),
            _str(me, "name", max_len=MAX_NAME),
            _subnet(me, "subnet"),
            _ip(me, "virtualIp"),
        ),
        tuple(_gateway_peer(g) for g in _list(data, "gateways")),
        tuple(parse_tunnel(t) for t in _list(data, "tunnels")),
    )


@dataclass(frozen=True, slots=True)
class GatewaySelf:
    """A gateway's own entry in its config: its slot and its address in every subnet."""

    id: str
    name: str
    slot: int
    public_ip: str | None
    wireguard_port: int | None
    addresses: tuple[str, ...]  # interface form, 100.64.0.1/24

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "slot": self.slot,
            "publicIp": self.public_ip,
            "wireguardPort": self.wireguard_port,
            "addresses": list(self.addresses),
        }


@dataclass(frozen=True, slots=True)
class AgentPeerSpec:
    """An agent as a gateway's WireGuard peer."""

    id: str
    name: str
    public_key: str
    subnet: str
    virtual_ip: str
    allowed_ips: tuple[str, ...]
    gateway_ip: str  # this gateway's address in the agent's subnet

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "publicKey": self.public_key,
            "subnet": self.subnet,
            "virtualIp": self.virtual_ip,
            "allowedIps": list(self.allowed_ips),
            "gatewayIp": self.gateway_ip,
        }


@dataclass(frozen=True, slots=True)
class CertificateSpec:
    """A certificate Control holds for a domain (TLS keys go to gateways only)."""

    domain: str
    certificate: str
    private_key: str
    not_after: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "certificate": self.certificate,
            "privateKey": self.private_key,
            "notAfter": self.not_after,
        }

    def __repr__(self) -> str:  # never the key, in a log or a traceback
        return f"CertificateSpec(domain={self.domain!r}, not_after={self.not_after})"


# -- access policies (gateways only: they hold password hashes and session keys) ----------
#
# A tunnel's access policy is evaluated by every gateway before any byte goes to the
# agent (``gateway/access/``); Control stores it and sends it in the gateway's config.
# Secrets arrive hashed (argon2id for passwords, SHA-256 for bearer and share tokens),
# except the OIDC client secret and the session keys, which a gateway needs as such.

PATH_ACTIONS = ("auth", "bypass", "deny", "bearer")
MAX_POLICY_ENTRIES = 1000
MAX_SESSION_TTL = 30 * 86400


@dataclass(frozen=True, slots=True)
class BasicUser:
    """An HTTP basic-auth user and the argon2id hash of their password."""

    user: str
    hash: str

    def to_wire(self) -> dict[str, Any]:
        return {"user": self.user, "hash": self.hash}

    def __repr__(self) -> str:
        return f"BasicUser(user={self.user!r})"


@dataclass(frozen=True, slots=True)
class PathRule:
    """What a path prefix asks: ``auth`` (the policy), ``bypass`` (no sign-in; IP rules
    still hold), ``deny``, or ``bearer`` (``Authorization: Bearer`` with the token whose
    SHA-256 is ``bearer_hash``)."""

    prefix: str
    action: str
    bearer_hash: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "action": self.action, "bearerHash": self.bearer_hash}


@dataclass(frozen=True, slots=True)
class ShareLink:
    """A share link: the SHA-256 of its token, when it expires (Unix time) and how
    many more times it may be used (None: any number)."""

    id: str
    token_hash: str
    expires_at: float
    uses_left: int | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tokenHash": self.token_hash,
            "expiresAt": self.expires_at,
            "usesLeft": self.uses_left,
        }


@dataclass(frozen=True, slots=True)
class OidcSpec:
    """OIDC single sign-on for a tunnel: the provider and who may pass."""

    issuer: str
    client_id: str
    client_secret: str
    scopes: tuple[str, ...]
    allowed_emails: tuple[str, ...]
    allowed_domains: tuple[str, ...]
    allowed_groups: tuple[str, ...]
    groups_claim: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "clientId": self.client_id,
            "clientSecret": self.client_secret,
            "scopes": list(self.scopes),
            "allowedEmails": list(self.allowed_emails),
            "allowedDomains": list(self.allowed_domains),
            "allowedGroups": list(self.allowed_groups),
            "groupsClaim": self.groups_claim,
        }

    def __repr__(self) -> str:  # never the client secret
        return f"OidcSpec(issuer={self.issuer!r}, client_id={self.client_id!r})"


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may reach one tunnel (see ``gateway/access/policy.py`` for the evaluation).

    ``epoch`` grows whenever a credential changes: sessions signed in under an older
    one end.  ``session_domain`` (a parent of the tunnel's domain) shares sign-in across
    the tunnels under it; ``session_ttl`` is how long a session lasts, in seconds.
    """

    tunnel_id: str
    epoch: int
    ip_allow: tuple[str, ...] = ()
    ip_deny: tuple[str, ...] = ()
    basic_users: tuple[BasicUser, ...] = ()
    password_hash: str | None = None
    oidc: OidcSpec | None = None
    share_links: tuple[ShareLink, ...] = ()
    paths: tuple[PathRule, ...] = ()
    session_domain: str | None = None
    session_ttl: int = 86400
    identity_headers: bool = True

    @property
    def sign_in(self) -> bool:
        """Whether the policy asks who the client is (else only IP rules apply)."""
        return bool(self.basic_users or self.password_hash or self.oidc or self.share_links) or any(
            rule.action == "bearer" for rule in self.paths
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "tunnelId": self.tunnel_id,
            "epoch": self.epoch,
            "ipAllow": list(self.ip_allow),
            "ipDeny": list(self.ip_deny),
            "basicUsers": [u.to_wire() for u in self.basic_users],
            "passwordHash": self.password_hash,
            "oidc": self.oidc.to_wire() if self.oidc is not None else None,
            "shareLinks": [link.to_wire() for link in self.share_links],
            "paths": [rule.to_wire() for rule in self.paths],
            "sessionDomain": self.session_domain,
            "sessionTtl": self.session_ttl,
            "identityHeaders": self.identity_headers,
        }

    def __repr__(self) -> str:
        return f"AccessPolicy(tunnel_id={self.tunnel_id!r}, epoch={self.epoch})"


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A key the gateways sign session cookies with (the first of the list signs;
    the others still verify, for a rotation)."""

    id: str
    secret: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "secret": base64.b64encode(self.secret).decode()}

    def __repr__(self) -> str:
        return f"SessionKey(id={self.id!r})"


_HASH_PREFIXES = ("$argon2id$",)


def _argon2_hash(data: dict[str, Any], key: str) -> str:
    text = _str(data, key, max_len=256)
    if not text.startswith(_HASH_PREFIXES):
        raise ProtocolError("invalid_field", f"'{key}' must be an argon2id hash")
    return text


def _sha256_hex(data: dict[str, Any], key: str) -> str:
    text = _str(data, key, max_len=64)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ProtocolError("invalid_field", f"'{key}' must be a SHA-256 in lower-case hex")
    return text


def _strings(data: dict[str, Any], key: str, *, max_len: int = 256) -> tuple[str, ...]:
    values = data.get(key, [])
    if not isinstance(values, list) or len(values) > MAX_POLICY_ENTRIES:
        raise ProtocolError(
            "invalid_field", f"'{key}' must be a list of at most {MAX_POLICY_ENTRIES}"
        )
    return tuple(_str({key: v}, key, max_len=max_len) for v in values)


def _policy_entries(data: dict[str, Any], key: str) -> list[Any]:
    values = data.get(key, [])
    if not isinstance(values, list) or len(values) > MAX_POLICY_ENTRIES:
        raise ProtocolError(
            "invalid_field", f"'{key}' must be a list of at most {MAX_POLICY_ENTRIES}"
        )
    return values


def _path_rule(value: object) -> PathRule:
    data = _object(value, "a path rule")
    prefix = _str(data, "prefix", max_len=1024)
    if not prefix.startswith("/") or not prefix.isascii() or any(c <= " " for c in prefix):
        raise ProtocolError("invalid_field", "'prefix' must be a path starting with /")
    action = _str(data, "action", max_len=16)
    if action not in PATH_ACTIONS:
        raise ProtocolError("invalid_field", f"'action' must be one of {PATH_ACTIONS}")
    bearer = _sha256_hex(data, "bearerHash") if action == "bearer" else None
    return PathRule(prefix, action, bearer)


def _share_link(value: object) -> ShareLink:
    data = _object(value, "a share link")
    expires = _number(data, "expiresAt")
    if not 0 <= expires <= 2**40:
        raise ProtocolError("invalid_field", "'expiresAt' must be a Unix time")
    return ShareLink(
        _str(data, "id", max_len=MAX_ID),
        _sha256_hex(data, "tokenHash"),
        expires,
        _optional_int(data, "usesLeft", 0, 2**31),
    )


def _oidc(value: object) -> OidcSpec:
    data = _object(value, "'oidc'")
    issuer = _str(data, "issuer", max_len=512)
    if not issuer.startswith(("https://", "http://")):
        raise ProtocolError("invalid_field", "'issuer' must be an http(s) URL")
    return OidcSpec(
        issuer,
        _str(data, "clientId", max_len=256),
        _str(data, "clientSecret", max_len=512, optional=True),
        _strings(data, "scopes", max_len=64) or ("openid", "email", "profile"),
        tuple(e.lower() for e in _strings(data, "allowedEmails")),
        tuple(d.lower() for d in _strings(data, "allowedDomains", max_len=MAX_DOMAIN)),
        _strings(data, "allowedGroups"),
        _str(data, "groupsClaim", max_len=64, optional=True) or "groups",
    )


def parse_access_policy(value: object) -> AccessPolicy:
    data = _object(value, "an access policy")
    password = None if data.get("passwordHash") is None else _argon2_hash(data, "passwordHash")
    oidc = None if data.get("oidc") is None else _oidc(data["oidc"])
    domain = None if data.get("sessionDomain") is None else _domain(data, "sessionDomain")
    identity = data.get("identityHeaders", True)
    if not isinstance(identity, bool):
        raise ProtocolError("invalid_field", "'identityHeaders' must be true or false")
    return AccessPolicy(
        _str(data, "tunnelId", max_len=MAX_ID),
        _int(data, "epoch", 0, 2**62),
        _prefixes({"ipAllow": data.get("ipAllow", [])}, "ipAllow"),
        _prefixes({"ipDeny": data.get("ipDeny", [])}, "ipDeny"),
        tuple(
            BasicUser(_str(u, "user", max_len=128), _argon2_hash(u, "hash"))
            for u in (_object(v, "a basic-auth user") for v in _policy_entries(data, "basicUsers"))
        ),
        password,
        oidc,
        tuple(_share_link(v) for v in _policy_entries(data, "shareLinks")),
        tuple(_path_rule(v) for v in _policy_entries(data, "paths")),
        domain,
        _int(data, "sessionTtl", 60, MAX_SESSION_TTL),
        identity,
    )


def _session_key(value: object) -> SessionKey:
    data = _object(value, "a session key")
    try:
        secret = base64.b64decode(_str(data, "secret", max_len=64), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_field", "'secret' is not valid base64") from None
    if len(secret) != 32:
        raise ProtocolError("invalid_field", "'secret' must encode 32 bytes")
    return SessionKey(_str(data, "id", max_len=MAX_ID), secret)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """``config`` for a gateway: itself, every agent, every tunnel, every certificate."""

    gateway: GatewaySelf
    agents: tuple[AgentPeerSpec, ...]
    tunnels: tuple[TunnelSpec, ...]
    certificates: tuple[CertificateSpec, ...]
    #: the tunnels' access policies (a tunnel without one is open to anyone)
    policies: tuple[AccessPolicy, ...] = ()
    #: the keys session cookies are signed with (the first signs)
    session_keys: tuple[SessionKey, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway.to_wire(),
            "agents": [a.to_wire() for a in self.agents],
            "tunnels": [t.to_wire() for t in self.tunnels],
            "certificates": [c.to_wire() for c in self.certificates],
            "policies": [policy.to_wire() for policy in self.policies],
            "sessionKeys": [key.to_wire() for key in self.session_keys],
        }


def _agent_peer(value: object) -> AgentPeerSpec:
    data = _object(value, "an agent")
    return AgentPeerSpec(
        _str(data, "id", max_len=MAX_ID),
        _str(data, "name", max_len=MAX_NAME),
        check_public_key(_str(data, "publicKey", max_len=64)),
        _subnet(data, "subnet"),
        _ip(data, "virtualIp"),
        _prefixes(data, "allowedIps"),
        _ip(data, "gatewayIp"),
    )


def _certificate(value: object) -> CertificateSpec:
    data = _object(value, "a certificate")
    certificate = _str(data, "certificate", max_len=64 * 1024)
    private_key = _str(data, "privateKey", max_len=16 * 1024)
    if "-----BEGIN CERTIFICATE-----" not in certificate:
        raise ProtocolError("invalid_field", "'certificate' must be a PEM chain")
    if "PRIVATE KEY-----" not in private_key:
        raise ProtocolError("invalid_field", "'privateKey' must be a PEM private key")
    return CertificateSpec(
        _domain(data, "domain"), certificate, private_key, _number(data, "notAfter")
    )


def parse_gateway_config(value: object) -> GatewayConfig:
    data = _object(value, "'data'")
    me = _object(data.get("gateway"), "'gateway'")
    public_ip = None if me.get("publicIp") is None else _ip(me, "publicIp")
    return GatewayConfig(
        GatewaySelf(
            _str(me, "id", max_len=MAX_ID),
            _str(me, "name", max_len=MAX_NAME),
            _int(me, "slot", 0, 2**31),
            public_ip,
            _optional_int(me, "wireguardPort", 1, 65535),
            _prefixes(me, "addresses", interface=True),
        ),
        tuple(_agent_peer(a) for a in _list(data, "agents")),
        tuple(parse_tunnel(t) for t in _list(data, "tunnels")),
        tuple(_certificate(c) for c in _list(data, "certificates")),
        tuple(parse_access_policy(v) for v in _optional_list(data, "policies")),
        tuple(_session_key(v) for v in _optional_list(data, "sessionKeys")),
    )


def _optional_list(data: dict[str, Any], key: str) -> list[Any]:
    """A list that an older Control does not send (absent: empty)."""
    return [] if data.get(key) is None else _list(data, key)


@dataclass(frozen=True, slots=True)
class AuthSuccess:
    """``auth_success``: who Control says we are, and how often to heart-beat."""

    id: str
    name: str
    client_type: str
    heartbeat_interval: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "clientType": self.client_type,
            "heartbeatInterval": self.heartbeat_interval,
        }


def parse_auth_success(value: object) -> AuthSuccess:
    data = _object(value, "'data'")
    client_type = _str(data, "clientType", max_len=16)
    if client_type not in CLIENT_TYPES:
        raise ProtocolError("invalid_field", "'clientType' must be 'agent' or 'gateway'")
    interval = _number(data, "heartbeatInterval")
    if not 1 <= interval <= 3600:
        raise ProtocolError("invalid_field", "'heartbeatInterval' must be in 1..3600 seconds")
    return AuthSuccess(
        _str(data, "id", max_len=MAX_ID),
        _str(data, "name", max_len=MAX_NAME),
        client_type,
        interval,
    )


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """``error`` (either way) and ``auth_error`` (Control only): a code and a message."""

    code: str
    message: str

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


def parse_error(value: object) -> ErrorReport:
    data = _object(value, "'data'")
    return ErrorReport(
        _str(data, "code", max_len=64, optional=True) or "unknown",
        _str(data, "message", max_len=512, optional=True),
    )


def parse_config(client_type: str, value: object) -> AgentConfig | GatewayConfig:
    """The ``config`` frame's data for ``client_type``."""
    if client_type == "agent":
        return parse_agent_config(value)
    return parse_gateway_config(value)


def retry_after_reason(seconds: int) -> str:
    """The close reason of :data:`CLOSE_TRY_AGAIN` asking for ``seconds``."""
    return f"retry after {max(1, min(MAX_RETRY_AFTER, int(seconds)))}"


def parse_retry_after(reason: str | None) -> int | None:
    """The seconds a ``CLOSE_TRY_AGAIN`` reason asks for (1..``MAX_RETRY_AFTER``), or
    None when it names none."""
    prefix = "retry after "
    if not reason or not reason.startswith(prefix):
        return None
    text = reason[len(prefix) :]
    if not (text.isascii() and text.isdigit()) or len(text) > 6:
        return None
    return max(1, min(MAX_RETRY_AFTER, int(text)))
