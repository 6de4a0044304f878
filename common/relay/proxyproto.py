"""PROXY protocol version 2 headers: how the gateway tells the agent which tunnel a
tunnelled connection is for, without the agent parsing HTTP.

Theory of operation
-------------------
The gateway opens a TCP connection through WireGuard to the agent's HTTP port and
writes one binary PROXY v2 header (haproxy's ``proxy-protocol.txt``, section 2.2)
before any payload.  The header carries a custom TLV (type ``TLV_TUNNEL`` = 0xE0, in
the range the specification reserves for application use, 0xE0-0xEF) holding the
tunnel's id; the agent looks the tunnel up, dials its target and splices bytes.  Every
HTTP decision (routing, header rewrites, the path prefix of a URL target) has already
been made at the gateway.

HTTP connections are pooled per (agent, tunnel) and carry many clients' requests, so
their header uses the ``LOCAL`` command with no addresses (the client of each request
is in its ``X-Forwarded-For``).  A connection carrying one client's stream from end to
end may use ``PROXY`` with the client's and the listener's addresses.

Layout (all integers in network byte order)::

    0..11   signature  \\r\\n\\r\\n\\0\\r\\nQUIT\\n
    12      version (high nibble, 2) | command (low nibble: 0 LOCAL, 1 PROXY)
    13      family (high nibble: 0 UNSPEC, 1 INET, 2 INET6) | transport (1 STREAM, 2 DGRAM)
    14..15  length of what follows (addresses, then TLVs)
    16..    addresses: INET 4+4+2+2 bytes, INET6 16+16+2+2 bytes, UNSPEC none
            TLVs: type (1 byte), length (2 bytes), value

The parser is strict where strictness costs nothing: a wrong signature, version,
command, family or transport, an address block longer than the length, a TLV running
past the end, or a header longer than ``MAX_HEADER_BYTES`` is a ``ProxyHeaderError``
(never an ``IndexError`` or a ``struct.error``).  Unknown TLVs are kept, as the
specification asks receivers to ignore what they do not understand.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from dataclasses import dataclass, field

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED_BYTES = 16  # signature + version/command + family/transport + length
#: the agent reads at most this much header; ours are a few dozen bytes
MAX_HEADER_BYTES = 1024

COMMAND_LOCAL = 0x0
COMMAND_PROXY = 0x1
_VERSION = 0x2
_FAMILY_UNSPEC = 0x0
_FAMILY_INET = 0x1
_FAMILY_INET6 = 0x2
_TRANSPORT_UNSPEC = 0x0
_TRANSPORT_STREAM = 0x1
_TRANSPORT_DGRAM = 0x2
_ADDRESS_BYTES = {_FAMILY_UNSPEC: 0, _FAMILY_INET: 12, _FAMILY_INET6: 36}

#: custom TLV: the id of the tunnel the connection belongs to (UTF-8)
TLV_TUNNEL = 0xE0
#: PP2_TYPE_ALPN (§2.2.1): the application protocol, here ``h2`` when the gateway
#: speaks HTTP/2 through the connection (the agent offers it to a TLS target)
TLV_ALPN = 0x01
MAX_TUNNEL_ID_BYTES = 255

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The bytes are not an acceptable PROXY v2 header (the message says why)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One decoded PROXY v2 header."""

    command: int = COMMAND_LOCAL
    #: (address, port) of the original client and of the listener it reached
    source: Address | None = None
    destination: Address | None = None
    transport: str = "tcp"  # "tcp" or "udp"
    tlvs: tuple[tuple[int, bytes], ...] = field(default=())

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type ``kind``, or None."""
        for tlv_type, value in self.tlvs:
            if tlv_type == kind:
                return value
        return None

    @property
    def tunnel_id(self) -> str | None:
        """The tunnel named by the ``TLV_TUNNEL`` TLV (None if absent)."""
        raw = self.tlv(TLV_TUNNEL)
        return None if raw is None else raw.decode("utf-8")


def encode(
    *,
    tunnel_id: str | None = None,
    source: Address | None = None,
    destination: Address | None = None,
    transport: str = "tcp",
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """Build a header: ``PROXY`` when both addresses are given, else ``LOCAL``.

    Raises ``ValueError`` for addresses of different families, a port out of range,
    a tunnel id that does not fit, or a TLV value over 65535 bytes.
    """
    if transport not in ("tcp", "udp"):
        raise ValueError("transport must be 'tcp' or 'udp'")
    if (source is None) != (destination is None):
        raise ValueError("give both addresses or neither")
    body = bytearray()
    if source is not None and destination is not None:
        src = ipaddress.ip_address(source[0])
        dst = ipaddress.ip_address(destination[0])
        if src.version != dst.version:
            raise ValueError("source and destination must be of one address family")
        for port in (source[1], destination[1]):
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"port {port} out of range")
        family = _FAMILY_INET if src.version == 4 else _FAMILY_INET6
        body += src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
        command = COMMAND_PROXY
        kind = _TRANSPORT_STREAM if transport == "tcp" else _TRANSPORT_DGRAM
    else:
        family, kind, command = _FAMILY_UNSPEC, _TRANSPORT_UNSPEC, COMMAND_LOCAL
    all_tlvs = list(tlvs)
    if any(tlv_type == TLV_TUNNEL for tlv_type, _ in all_tlvs):
        raise ValueError("name the tunnel with tunnel_id, not as a raw TLV")
    if tunnel_id is not None:
        raw = tunnel_id.encode("utf-8")
        if not 0 < len(raw) <= MAX_TUNNEL_ID_BYTES:
            raise ValueError("a tunnel id is 1 to 255 bytes of UTF-8")
        all_tlvs.insert(0, (TLV_TUNNEL, raw))
    for tlv_type, value in all_tlvs:
        if not 0 <= tlv_type <= 0xFF or len(value) > 0xFFFF:
            raise ValueError("a TLV has a one-byte type and at most 65535 bytes")
        body += struct.pack("!BH", tlv_type, len(value)) + value
    if FIXED_BYTES + len(body) > MAX_HEADER_BYTES:
        raise ValueError(f"the header would exceed {MAX_HEADER_BYTES} bytes")
    return (
        SIGNATURE
        + bytes(((_VERSION << 4) | command, (family << 4) | kind))
        + (struct.pack("!H", len(body)) + bytes(body))
    )


def header_length(fixed: bytes) -> int:
    """Check the 16 fixed bytes; return how many bytes the whole header has."""
    if len(fixed) < FIXED_BYTES:
        raise ProxyHeaderError("truncated PROXY header")
    if fixed[:12] != SIGNATURE:
        raise ProxyHeaderError("no PROXY v2 signature")
    version, command = fixed[12] >> 4, fixed[12] & 0x0F
    if version != _VERSION:
        raise ProxyHeaderError(f"unsupported PROXY version {version}")
    if command not in (COMMAND_LOCAL, COMMAND_PROXY):
        raise ProxyHeaderError(f"unknown PROXY command {command}")
    family, kind = fixed[13] >> 4, fixed[13] & 0x0F
    if family not in _ADDRESS_BYTES:
        raise ProxyHeaderError(f"unsupported address family {family}")
    if kind not in (_TRANSPORT_UNSPEC, _TRANSPORT_STREAM, _TRANSPORT_DGRAM):
        raise ProxyHeaderError(f"unknown transport {kind}")
    total = FIXED_BYTES + int.from_bytes(fixed[14:16], "big")
    if total > MAX_HEADER_BYTES:
        raise ProxyHeaderError(f"PROXY header longer than {MAX_HEADER_BYTES} bytes")
    return total


def decode(data: bytes) -> ProxyHeader:
    """Decode exactly one whole header (``header_length`` bytes of it)."""
    total = header_length(data[:FIXED_BYTES])
    if len(data) != total:
        raise ProxyHeaderError("truncated PROXY header" if len(data) < total else "trailing bytes")
    command = data[12] & 0x0F
    family, kind = data[13] >> 4, data[13] & 0x0F
    body = memoryview(data)[FIXED_BYTES:]
    address_bytes = _ADDRESS_BYTES[family]
    if len(body) < address_bytes:
        raise ProxyHeaderError("address block longer than the header")
    source = destination = None
    if command == COMMAND_PROXY:
        if family == _FAMILY_UNSPEC or kind == _TRANSPORT_UNSPEC:
            raise ProxyHeaderError("a PROXY command needs an address family and transport")
        size = 4 if family == _FAMILY_INET else 16
        src = ipaddress.ip_address(bytes(body[:size]))
        dst = ipaddress.ip_address(bytes(body[size : 2 * size]))
        sport, dport = struct.unpack_from("!HH", body, 2 * size)
        source, destination = (str(src), sport), (str(dst), dport)
    # LOCAL: the address block, if any, is skipped as the specification says
    tlvs: list[tuple[int, bytes]] = []
    offset = address_bytes
    while offset < len(body):
        if len(body) - offset < 3:
            raise ProxyHeaderError("truncated TLV")
        tlv_type, length = struct.unpack_from("!BH", body, offset)
        offset += 3
        if length > len(body) - offset:
            raise ProxyHeaderError("TLV runs past the end of the header")
        tlvs.append((tlv_type, bytes(body[offset : offset + length])))
        offset += length
    header = ProxyHeader(
        command, source, destination, "udp" if kind == _TRANSPORT_DGRAM else "tcp", tuple(tlvs)
    )
    raw_tunnel = header.tlv(TLV_TUNNEL)
    if raw_tunnel is not None:
        if not 0 < len(raw_tunnel) <= MAX_TUNNEL_ID_BYTES:
            raise ProxyHeaderError("bad tunnel id length")
        try:
            raw_tunnel.decode("utf-8")
        except UnicodeDecodeError:
            raise ProxyHeaderError("tunnel id is not UTF-8") from None
    return header


async def read_header(reader: asyncio.StreamReader, timeout: float) -> ProxyHeader:  # noqa: ASYNC109
    """Read one header from the front of a stream within ``timeout`` seconds.

    Raises ``ProxyHeaderError`` for anything but a whole, valid header in time
    (bad bytes, EOF before the end, the deadline).  Nothing past the header is read.
    """
    try:
        async with asyncio.timeout(timeout):
            fixed = await reader.readexactly(FIXED_BYTES)
            total = header_length(fixed)
            rest = await reader.readexactly(total - FIXED_BYTES) if total > FIXED_BYTES else b""
    except asyncio.IncompleteReadError:
        raise ProxyHeaderError("connection ended inside the PROXY header") from None
    except TimeoutError:
        raise ProxyHeaderError("no PROXY header in time") from None
    except (ConnectionError, OSError) as exc:
        raise ProxyHeaderError(f"connection failed before the PROXY header: {exc}") from None
    return decode(fixed + rest)
