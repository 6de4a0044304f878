"""TCP segment wire format (RFC 9293 section 3.1) with the options we speak.

Theory of operation
-------------------
``parse_tcp`` checks the header length and data offset against the buffer, verifies
the checksum over the pseudo-header (RFC 9293 section 3.1; RFC 8200 section 8.1 for
IPv6), and decodes the options into a ``TcpSegment`` value object.  Any malformed
input raises ``TcpError`` and nothing else.

Options understood (anything else is skipped by its length, RFC 9293 section 3.2):
MSS (kind 2, RFC 9293 3.7.1), window scale (kind 3, RFC 7323 section 2), SACK-permitted
and SACK (kinds 4 and 5, RFC 2018), timestamps (kind 8, RFC 7323 section 3).  Known
options with a wrong length are ignored, as Linux does, rather than failing the
segment; a length byte that runs past the header is an error.

``build_tcp`` lays the options out the way Linux does (SYN: MSS, SACK-permitted +
timestamps, NOP + window scale; others: NOP NOP timestamps, NOP NOP SACK blocks) so
every segment stays 4-byte aligned, and fills in the checksum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netstack.checksum import checksum, pseudo_header_sum

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

TCP_HEADER_LEN = 20
MAX_SACK_BLOCKS = 4
MAX_OPTIONS_LEN = 40

_HEADER = struct.Struct("!HHIIBBHHH")
_PROTO_TCP = 6


class TcpError(ValueError):
    """A segment that is not well-formed TCP."""


@dataclass(slots=True, unsafe_hash=True)
class TcpSegment:
    """One TCP segment; option fields are None/empty when the option is absent.

    A value object: never changed after construction.  Not ``frozen`` only because a
    frozen dataclass's ``__init__`` costs about 1.5 us more (one ``object.__setattr__``
    per field), paid on every segment in and out.
    """

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes = b""
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamp: tuple[int, int] | None = None
    sack_blocks: tuple[tuple[int, int], ...] = ()

    @property
    def seq_length(self) -> int:
        """Sequence space used: payload plus one for each of SYN and FIN."""
        return len(self.payload) + (self.flags & SYN) // SYN + (self.flags & FIN)


def parse_tcp(data: bytes, src: bytes, dst: bytes, *, verify_checksum: bool = True) -> TcpSegment:
    """Parse one segment carried between packed addresses ``src`` and ``dst``."""
    length = len(data)
    if length < TCP_HEADER_LEN:
        raise TcpError("truncated TCP header")
    src_port, dst_port, seq, ack, offset_byte, flags, window, _csum, _urg = _HEADER.unpack_from(
        data
    )
    header_len = (offset_byte >> 4) * 4
    if header_len < TCP_HEADER_LEN or header_len > length:
        raise TcpError("TCP data offset out of range")
    if verify_checksum and checksum(data, pseudo_header_sum(src, dst, _PROTO_TCP, length)) != 0:
        raise TcpError("bad TCP checksum")
    payload = data[header_len:]
    if header_len == TCP_HEADER_LEN:
        return TcpSegment(src_port, dst_port, seq, ack, flags, window, payload)
    mss: int | None = None
    wscale: int | None = None
    sack_permitted = False
    timestamp: tuple[int, int] | None = None
    sack_blocks: list[tuple[int, int]] = []
    i = TCP_HEADER_LEN
    while i < header_len:
        kind = data[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= header_len:
            raise TcpError("truncated TCP option")
        opt_len = data[i + 1]
        if opt_len < 2 or i + opt_len > header_len:
            raise TcpError("bad TCP option length")
        if kind == 2 and opt_len == 4:
            mss = (data[i + 2] << 8) | data[i + 3]
        elif kind == 3 and opt_len == 3:
            wscale = min(data[i + 2], 14)  # RFC 7323 section 2.3: clamp to 14
        elif kind == 4 and opt_len == 2:
            sack_permitted = True
        elif kind == 5 and opt_len >= 10 and (opt_len - 2) % 8 == 0:
            for j in range(i + 2, i + opt_len, 8):
                sack_blocks.append(struct.unpack_from("!II", data, j))
        elif kind == 8 and opt_len == 10:
            timestamp = struct.unpack_from("!II", data, i + 2)
        i += opt_len
    return TcpSegment(
        src_port,
        dst_port,
        seq,
        ack,
        flags,
        window,
        payload,
        mss,
        wscale,
        sack_permitted,
        timestamp,
        tuple(sack_blocks),
    )


def options_length(
    *,
    mss: bool = False,
    wscale: bool = False,
    sack_permitted: bool = False,
    timestamp: bool = False,
    sack_blocks: int = 0,
) -> int:
    """Bytes of options ``build_tcp`` emits for this combination."""
    total = 4 if mss else 0
    if timestamp:
        total += 12  # SACK-permitted, if any, takes the two NOP slots before it
    elif sack_permitted:
        total += 4
    if wscale:
        total += 4
    if sack_blocks:
        total += 4 + 8 * sack_blocks
    return total


def build_tcp(segment: TcpSegment, src: bytes, dst: bytes) -> bytes:
    """The wire form of ``segment`` (checksum included) between packed addresses."""
    opts = bytearray()
    if segment.mss is not None:
        opts += struct.pack("!BBH", 2, 4, segment.mss)
    if segment.timestamp is not None:
        if segment.sack_permitted:
            opts += b"\x04\x02"
        else:
            opts += b"\x01\x01"
        opts += struct.pack("!BBII", 8, 10, segment.timestamp[0], segment.timestamp[1])
    elif segment.sack_permitted:
        opts += b"\x01\x01\x04\x02"
    if segment.wscale is not None:
        opts += struct.pack("!BBBB", 1, 3, 3, segment.wscale)
    room = (MAX_OPTIONS_LEN - len(opts) - 4) // 8  # SACK gets what is left (RFC 2018 3)
    if segment.sack_blocks and room > 0:
        blocks = segment.sack_blocks[: min(MAX_SACK_BLOCKS, room)]
        opts += struct.pack("!BBBB", 1, 1, 5, 2 + 8 * len(blocks))
        for left, right in blocks:
            opts += struct.pack("!II", left, right)
    header_len = TCP_HEADER_LEN + len(opts)
    buf = bytearray(header_len + len(segment.payload))
    _HEADER.pack_into(
        buf,
        0,
        segment.src_port,
        segment.dst_port,
        segment.seq,
        segment.ack,
        (header_len // 4) << 4,
        segment.flags,
        segment.window,
        0,
        0,
    )
    buf[TCP_HEADER_LEN:header_len] = opts
    buf[header_len:] = segment.payload
    csum = checksum(buf, pseudo_header_sum(src, dst, _PROTO_TCP, len(buf)))
    struct.pack_into("!H", buf, 16, csum)
    return bytes(buf)
