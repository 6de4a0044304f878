"""PROXY protocol headers (haproxy's ``proxy-protocol.txt``): version 2, how the
gateway tells the agent which tunnel a tunnelled connection is for (and, for raw TCP/UDP
tunnels with ``proxyProtocol`` set, which client it carries) without the agent parsing
HTTP; and versions 1 and 2 as the agent writes them to a target that asked for them.

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

Raw tunnels (``proxyProtocol`` v1/v2)
-------------------------------------
A raw TCP connection of such a tunnel reaches the agent's tunnel port (the one HTTP
tunnels use) with a ``PROXY`` header: the client's address and port as source, the
gateway's listener as destination, the tunnel id as ``TLV_TUNNEL``.  A UDP datagram of
such a tunnel goes to the agent's tunnel port over UDP, each datagram prefixed by its own
``PROXY``/``DGRAM`` header (no TLV: the destination port names the tunnel; 28 bytes for
IPv4, 52 for IPv6, taken from the datagram's room in the tunnel).  ``split_datagram``
takes one apart.  The agent then writes ``target_header`` to the target: version 1's
text line (§2.1, TCP only: ``PROXY TCP4|TCP6 src dst sport dport\r\n``, at most 107
bytes) or version 2's binary header, and for UDP a version 2 header in front of every
datagram.  ``HeaderReader`` reads either version from the front of a stream fed in
pieces (what a target does; the tests use it as the receiving end).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
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
    #: 2 for the binary header, 1 for the text line (whose UNKNOWN is ``COMMAND_LOCAL``)
    version: int = 2

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


# -- raw tunnels: datagrams, addresses, what a target is sent ---------------------------


def split_datagram(data: bytes) -> tuple[ProxyHeader, bytes]:
    """The version 2 header at the front of one datagram and the payload after it.

    With ``proxyProtocol`` on a UDP tunnel every datagram carries its own header (UDP
    has no connection to put one in front of); ``ProxyHeaderError`` when the datagram
    does not start with a whole, valid one.
    """
    total = header_length(data[:FIXED_BYTES])
    if len(data) < total:
        raise ProxyHeaderError("datagram shorter than its PROXY header")
    return decode(data[:total]), data[total:]


def plain_address(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) as the
    IPv4 address it is, so that a header says ``TCP4`` for an IPv4 client."""
    host = ipaddress.ip_address(address[0])
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        return str(host.ipv4_mapped), address[1]
    return str(host), address[1]


def address_pair(source: Address, destination: Address) -> tuple[Address, Address]:
    """Source and destination for one header: both unmapped, and of the source's family
    (a header holds one family; a destination that cannot be given in it becomes the
    unspecified address of the source's family, with its port)."""
    src, dst = plain_address(source), plain_address(destination)
    if ipaddress.ip_address(src[0]).version != ipaddress.ip_address(dst[0]).version:
        unspecified = "0.0.0.0" if ipaddress.ip_address(src[0]).version == 4 else "::"
        dst = (unspecified, dst[1])
    return src, dst


def target_header(
    version: str,
    source: Address | None = None,
    destination: Address | None = None,
    transport: str = "tcp",
) -> bytes:
    """What a target that expects PROXY protocol ``version`` ("v1" or "v2") gets first.

    With both addresses: the client's (v1: the text line, v2: a ``PROXY`` header of the
    transport, no TLVs).  Without them (the agent was reached without the gateway's
    header, see ``common.relay.tcp``): the specification's "unknown" form, v1
    ``PROXY UNKNOWN`` and v2 ``LOCAL``, which tell the target to use the connection's
    own addresses.  ``ValueError`` for an unknown version and for v1 over UDP (version 1
    has no datagram form).
    """
    if version == "v2":
        if source is None or destination is None:
            return encode()
        src, dst = address_pair(source, destination)
        return encode(source=src, destination=dst, transport=transport)
    if version == "v1":
        if transport != "tcp":
            raise ValueError("PROXY protocol version 1 has no UDP form")
        if source is None or destination is None:
            return encode_v1()
        return encode_v1(*address_pair(source, destination))
    raise ValueError(f"unknown PROXY protocol version {version!r}")


# -- version 1: the text line (§2.1) ------------------------------------------------------

V1_PREFIX = b"PROXY "
#: the longest line a receiver must take, CRLF included (§2.1's worst case)
V1_MAX_BYTES = 107
_V1_IPV4 = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_V1_UNKNOWN = b"PROXY UNKNOWN"


def encode_v1(source: Address | None = None, destination: Address | None = None) -> bytes:
    """The version 1 line: ``PROXY TCP4|TCP6 src dst sport dport\\r\\n`` with both
    addresses, ``PROXY UNKNOWN\\r\\n`` with neither.  ``ValueError`` as for ``encode``."""
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    if source is None or destination is None:
        raise ValueError("give both addresses or neither")
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be of one address family")
    for port in (source[1], destination[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range")
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def v1_line_length(data: bytes) -> int | None:
    """How many bytes the version 1 line at the front of ``data`` has (CRLF included),
    or None while it may still become one; ``ProxyHeaderError`` as soon as it cannot
    (no ``PROXY `` prefix, a lone CR or LF, no CRLF within ``V1_MAX_BYTES``)."""
    head = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyHeaderError("no PROXY v1 signature")
    window = data[:V1_MAX_BYTES]
    for index, byte in enumerate(window):
        if byte == 0x0A:  # LF without the CR before it
            raise ProxyHeaderError("a PROXY v1 line ends with CRLF, not a lone LF")
        if byte == 0x0D:
            if index + 1 == len(window):
                break  # CR as the last byte seen: wait for what follows it
            if window[index + 1] != 0x0A:
                raise ProxyHeaderError("a PROXY v1 line ends with CRLF, not a lone CR")
            return index + 2
    if len(data) >= V1_MAX_BYTES:
        raise ProxyHeaderError(f"no CRLF in the first {V1_MAX_BYTES} bytes of a PROXY v1 line")
    return None


def _v1_address(text: str, version: int) -> str:
    if version == 4:
        if not _V1_IPV4.fullmatch(text):
            raise ProxyHeaderError(f"bad IPv4 address in a PROXY v1 line: {text[:45]!r}")
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise ProxyHeaderError(f"bad IPv4 address in a PROXY v1 line: {text!r}") from None
    if not _V1_IPV6.fullmatch(text):  # no zone ("%eth0"): ipaddress would take one
        raise ProxyHeaderError(f"bad IPv6 address in a PROXY v1 line: {text[:45]!r}")
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ProxyHeaderError(f"bad IPv6 address in a PROXY v1 line: {text!r}") from None


def _v1_port(text: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 0xFFFF:
        raise ProxyHeaderError(f"bad port in a PROXY v1 line: {text[:8]!r}")
    return int(text)


def decode_v1(line: bytes) -> ProxyHeader:
    """Decode exactly one version 1 line, CRLF included (§2.1: single spaces, canonical
    addresses of the announced family, ports without leading zeros).  ``UNKNOWN`` gives
    a ``COMMAND_LOCAL`` header without addresses (the rest of its line is ignored, as
    the specification says)."""
    total = v1_line_length(line)
    if total is None:
        raise ProxyHeaderError("truncated PROXY v1 line")
    if total != len(line):
        raise ProxyHeaderError("trailing bytes")
    if line[: len(_V1_UNKNOWN)] == _V1_UNKNOWN and line[len(_V1_UNKNOWN)] in b" \r":
        return ProxyHeader(COMMAND_LOCAL, version=1)  # whatever follows is ignored
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("a PROXY v1 line is US-ASCII") from None
    fields = text.split(" ")
    if fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"unknown PROXY v1 protocol {fields[1][:8]!r}")
    if len(fields) != 6:
        raise ProxyHeaderError("a PROXY v1 line has six fields separated by single spaces")
    family = 4 if fields[1] == "TCP4" else 6
    source = (_v1_address(fields[2], family), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], family), _v1_port(fields[5]))
    return ProxyHeader(COMMAND_PROXY, source, destination, "tcp", (), version=1)


class HeaderReader:
    """Reads one PROXY header (version 1 or 2, as allowed) from the front of a byte
    stream fed in pieces, as a target does (sans-IO).

    ``feed`` returns None until the header is whole, then the header and what came
    after it; from then on it must not be called again.  ``ProxyHeaderError`` as soon as
    the bytes cannot begin an allowed header (§2.2: the first byte tells the versions
    apart), without waiting for more.
    """

    def __init__(self, *, v1: bool = True, v2: bool = True) -> None:
        if not (v1 or v2):
            raise ValueError("allow at least one version")
        self.v1, self.v2 = v1, v2
        self.buffer = bytearray()

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        self.buffer += data
        buffer = bytes(self.buffer)
        if not buffer:
            return None
        if self.v2 and buffer[0] == SIGNATURE[0]:
            if len(buffer) < FIXED_BYTES:
                if not SIGNATURE.startswith(buffer[:12]):
                    raise ProxyHeaderError("no PROXY v2 signature")
                return None
            total = header_length(buffer[:FIXED_BYTES])
            if len(buffer) < total:
                return None
            return decode(buffer[:total]), buffer[total:]
        if self.v1 and buffer[0] == V1_PREFIX[0]:
            length = v1_line_length(buffer)
            if length is None:
                return None
            return decode_v1(buffer[:length]), buffer[length:]
        raise ProxyHeaderError("no PROXY header")
