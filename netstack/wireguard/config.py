"""wg-quick style configuration files: parse, write, apply to a :class:`WireGuardEngine`.

Theory of operation: the format is INI-like -- one ``[Interface]`` section and any
number of ``[Peer]`` sections, ``Key = Value`` lines, ``#`` comments, keys matched
case-insensitively, list values comma separated and repeatable.  Keys are base64 of
32 bytes.  Both ``wg`` keys (PrivateKey, ListenPort, FwMark, PublicKey,
PresharedKey, AllowedIPs, Endpoint, PersistentKeepalive) and wg-quick's extras
(Address, DNS, MTU, Table, Pre/PostUp/Down, SaveConfig) are understood; anything
else is a :class:`ConfigError` naming the line, so a typo is never silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass, field

from .allowedips import Network, parse_network
from .engine import WireGuardEngine
from .errors import ConfigError

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

_INTERFACE_KEYS = {
    "privatekey",
    "listenport",
    "fwmark",
    "address",
    "dns",
    "mtu",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
}
_PEER_KEYS = {"publickey", "presharedkey", "allowedips", "endpoint", "persistentkeepalive"}


def decode_key(text: str, setting: str = "key") -> bytes:
    """Base64 of exactly 32 bytes, as ``wg genkey`` prints."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{setting}: not valid base64") from exc
    if len(raw) != 32:
        raise ConfigError(f"{setting}: a key is 32 bytes, got {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port``."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"Endpoint {text!r}: expected [address]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ConfigError(f"Endpoint {text!r}: expected host:port")
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ConfigError(f"Endpoint {text!r}: port is not a number") from exc
    if not 1 <= port <= 65535:
        raise ConfigError(f"Endpoint {text!r}: port out of range")
    return host, port


def _format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _int(value: str, setting: str, low: int, high: int) -> int:
    try:
        number = int(value, 0)
    except ValueError as exc:
        raise ConfigError(f"{setting}: {value!r} is not a number") from exc
    if not low <= number <= high:
        raise ConfigError(f"{setting}: {number} is outside {low}..{high}")
    return number


@dataclass(frozen=True)
class PeerConfig:
    """One ``[Peer]`` section."""

    public_key: bytes
    preshared_key: bytes | None = None
    allowed_ips: tuple[Network, ...] = ()
    endpoint: tuple[str, int] | None = None
    persistent_keepalive: int = 0


@dataclass(frozen=True)
class InterfaceConfig:
    """The ``[Interface]`` section (wg-quick extras kept verbatim in ``extra``)."""

    private_key: bytes
    listen_port: int | None = None
    addresses: tuple[Interface, ...] = ()
    mtu: int | None = None
    extra: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Config:
    """A whole wg-quick configuration."""

    interface: InterfaceConfig
    peers: tuple[PeerConfig, ...] = field(default=())


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_config(text: str) -> Config:
    """Parse a wg-quick configuration; raises :class:`ConfigError` naming the problem."""
    sections: list[tuple[str, int, list[tuple[str, str, int]]]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"line {lineno}: malformed section header {line!r}")
            name = line[1:-1].strip().lower()
            if name not in ("interface", "peer"):
                raise ConfigError(f"line {lineno}: unknown section [{line[1:-1]}]")
            sections.append((name, lineno, []))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"line {lineno}: expected Key = Value, got {line!r}")
        if not sections:
            raise ConfigError(f"line {lineno}: {key.strip()} outside of a section")
        sections[-1][2].append((key.strip(), value.strip(), lineno))

    interfaces = [s for s in sections if s[0] == "interface"]
    if len(interfaces) != 1:
        raise ConfigError(f"expected exactly one [Interface] section, found {len(interfaces)}")
    interface: InterfaceConfig | None = None
    peers: list[PeerConfig] = []
    for name, lineno, entries in sections:
        if name == "interface":
            interface = _parse_interface(entries, lineno)
        else:
            peers.append(_parse_peer(entries, lineno))
    assert interface is not None
    keys = [p.public_key for p in peers]
    if len(set(keys)) != len(keys):
        raise ConfigError("the same PublicKey appears in two [Peer] sections")
    return Config(interface, tuple(peers))


def _parse_interface(entries: list[tuple[str, str, int]], lineno: int) -> InterfaceConfig:
    private_key: bytes | None = None
    listen_port: int | None = None
    addresses: list[Interface] = []
    mtu: int | None = None
    extra: list[tuple[str, str]] = []
    for key, value, line in entries:
        lower = key.lower()
        where = f"line {line}: {key}"
        if lower not in _INTERFACE_KEYS:
            raise ConfigError(f"{where}: unknown [Interface] setting")
        if lower == "privatekey":
            private_key = decode_key(value, where)
        elif lower == "listenport":
            listen_port = _int(value, where, 0, 65535)
        elif lower == "mtu":
            mtu = _int(value, where, 576, 65535)
        elif lower == "address":
            for item in _split_list(value):
                try:
                    addresses.append(ipaddress.ip_interface(item))
                except ValueError as exc:
                    raise ConfigError(f"{where}: invalid address {item!r}") from exc
        else:
            extra.append((key, value))
    if private_key is None:
        raise ConfigError(f"[Interface] at line {lineno}: PrivateKey is required")
    return InterfaceConfig(private_key, listen_port, tuple(addresses), mtu, tuple(extra))


def _parse_peer(entries: list[tuple[str, str, int]], lineno: int) -> PeerConfig:
    public_key: bytes | None = None
    psk: bytes | None = None
    allowed: list[Network] = []
    endpoint: tuple[str, int] | None = None
    keepalive = 0
    for key, value, line in entries:
        lower = key.lower()
        where = f"line {line}: {key}"
        if lower not in _PEER_KEYS:
            raise ConfigError(f"{where}: unknown [Peer] setting")
        if lower == "publickey":
            public_key = decode_key(value, where)
        elif lower == "presharedkey":
            psk = decode_key(value, where)
        elif lower == "allowedips":
            for item in _split_list(value):
                try:
                    allowed.append(parse_network(item))
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from exc
        elif lower == "endpoint":
            try:
                endpoint = parse_endpoint(value)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
        else:
            keepalive = 0 if value.lower() == "off" else _int(value, where, 0, 65535)
    if public_key is None:
        raise ConfigError(f"[Peer] at line {lineno}: PublicKey is required")
    return PeerConfig(public_key, psk, tuple(allowed), endpoint, keepalive)


def format_config(config: Config) -> str:
    """Write a configuration that :func:`parse_config` (and wg-quick) reads back."""
    iface = config.interface
    lines = ["[Interface]", f"PrivateKey = {encode_key(iface.private_key)}"]
    if iface.listen_port is not None:
        lines.append(f"ListenPort = {iface.listen_port}")
    if iface.addresses:
        lines.append("Address = " + ", ".join(str(a) for a in iface.addresses))
    if iface.mtu is not None:
        lines.append(f"MTU = {iface.mtu}")
    lines.extend(f"{key} = {value}" for key, value in iface.extra)
    for peer in config.peers:
        lines += ["", "[Peer]", f"PublicKey = {encode_key(peer.public_key)}"]
        if peer.preshared_key is not None:
            lines.append(f"PresharedKey = {encode_key(peer.preshared_key)}")
        if peer.allowed_ips:
            lines.append("AllowedIPs = " + ", ".join(str(n) for n in peer.allowed_ips))
        if peer.endpoint is not None:
            lines.append(f"Endpoint = {_format_endpoint(peer.endpoint)}")
        if peer.persistent_keepalive:
            lines.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    return "\n".join(lines) + "\n"


def apply_peers(
    config: Config,
    engine: WireGuardEngine,
    now: float | None = None,
    resolved: dict[tuple[str, int], tuple[str, int]] | None = None,
) -> None:
    """Make ``engine``'s peers exactly those of ``config`` (others are removed).

    Endpoint hosts must be IP literals or appear in ``resolved`` (the asyncio
    adapter's ``resolve_endpoints`` builds it): the sans-IO core never does DNS.
    """
    resolved = resolved or {}
    for peer in config.peers:
        if peer.endpoint is not None and peer.endpoint not in resolved:
            try:
                ipaddress.ip_address(peer.endpoint[0])
            except ValueError as exc:
                raise ConfigError(
                    f"Endpoint {peer.endpoint[0]!r} is a host name; resolve it first"
                ) from exc
    wanted = {p.public_key for p in config.peers}
    for key in list(engine.peers):
        if key not in wanted:
            engine.remove_peer(key)
    for peer in config.peers:
        engine.set_peer(
            peer.public_key,
            preshared_key=peer.preshared_key,
            allowed_ips=peer.allowed_ips,
            endpoint=None if peer.endpoint is None else resolved.get(peer.endpoint, peer.endpoint),
            persistent_keepalive=peer.persistent_keepalive,
            now=now,
        )
