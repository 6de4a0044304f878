"""Pure-Python twin of the TCP/IP stack's Cython hot path (``netstack/_fast.pyx``; the
checksum's twin is in ``netstack/checksum.py``, WireGuard's in
``netstack/wireguard/_pure.py``).

The TCP packet twins are defined by the full parsers/builders of ``ip`` and ``tcpwire``; the
established-state receive path and its packet loop are defined by
``TcpConnection.receive`` and ``Stack.receive_packets`` without them (the general path
they short-cut), the send run by ``_transmit``'s loop without it.

Every function here has an identical twin in ``_fast.pyx``; ``netstack.speedups``
picks one, and the same tests run against both.
"""

from __future__ import annotations

from typing import Any

from netstack import events as _ev
from netstack import ip as ip_module
from netstack import tcpwire


def parse_tcp_packet(packet: bytes, segment_type: Any) -> tuple[bytes, bytes, Any] | None:
    """``(src, dst, segment)`` for a well-formed IPv4/IPv6 TCP packet, None for anything
    else (malformed, a fragment, not TCP, IPv6 extension headers); the twin of
    ``_fast.parse_tcp_packet``, defined by the full parsers it short-cuts."""
    if type(packet) is not bytes:
        return None
    try:
        ip = ip_module.parse_ip(packet)
    except ip_module.IpError:
        return None
    if ip.protocol != 6 or (ip.version == 6 and len(ip.header) != 40):
        return None
    try:
        segment = tcpwire.parse_tcp(ip.payload, ip.src, ip.dst)
    except tcpwire.TcpError:
        return None
    if segment_type is not type(segment):
        segment = segment_type(*(getattr(segment, name) for name in segment.__slots__))
    return ip.src, ip.dst, segment


def build_tcp_packet(segment: Any, src: bytes, dst: bytes) -> bytes:
    """The IP packet carrying ``segment`` from ``src`` to ``dst`` (packed addresses); the
    twin of ``_fast.build_tcp_packet``, defined by the builders it short-cuts."""
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise ValueError("addresses must both be 4 or both 16 bytes")
    return ip_module.build_ip(src, dst, 6, tcpwire.build_tcp(segment, src, dst))


_MASK32 = 0xFFFFFFFF
_ACK = 0x10
_PSH = 0x08
_CONTROL = 0x37  # FIN, SYN, RST, ACK, URG: only ACK may be set on the fast path


def tcp_receive_established(conn: Any, seg: Any, now: float) -> bool:
    """The established-state receive path for the common segment: in order, ACK only
    (PSH allowed), no SACK blocks, while nothing is being recovered or reassembled, and
    not the ACK of our FIN (which changes the state).

    Does exactly what ``TcpConnection.receive`` would do with it and returns True, or
    changes nothing and returns False for the general path.  ``conn`` is in
    ESTABLISHED, FIN-WAIT-1 or FIN-WAIT-2 (checked by the caller).
    """
    flags = seg.flags
    if flags & _CONTROL != _ACK or seg.sack_blocks:
        return False
    if conn._in_recovery or conn._sacked or conn._dupacks or conn._undo_pending or conn._ooo:
        return False
    rcv_nxt = conn._rcv_nxt
    if (seg.seq - conn._irs - rcv_nxt) & _MASK32:
        return False  # not the next byte expected
    payload = seg.payload
    size = len(payload)
    ts = seg.timestamp
    ts_ok = conn._ts_ok
    if ts_ok and ts is not None and (ts[0] - conn._ts_recent) & _MASK32 >= 0x80000000:
        return False  # PAWS
    if size and size > conn._rcv_adv - rcv_nxt:
        return False  # beyond the window (or a zero window): trimmed by the general path
    snd_una = conn._snd_una
    advance = (seg.ack - conn._iss - snd_una) & _MASK32
    if advance >= 0x80000000:
        return False  # an old ACK
    ack = snd_una + advance
    snd_max = conn._snd_max
    if ack > snd_max:
        return False  # acknowledges what was never sent
    fin = conn._fin_offset
    if fin is not None and ack > fin >= snd_una:
        return False  # acknowledges our FIN: a state change
    window = seg.window << conn._snd_wscale
    if not advance and not size and snd_max > snd_una and window == conn._snd_wnd:
        return False  # a duplicate ACK
    # -- from here on the segment is ours.
    conn._last_receive = now
    conn._keepalive_probes = 0
    wl1 = conn._snd_wl1
    if wl1 < rcv_nxt or (wl1 == rcv_nxt and conn._snd_wl2 <= ack):
        conn._snd_wnd = window
        conn._snd_wl1 = rcv_nxt
        conn._snd_wl2 = ack
        if window > conn._max_snd_wnd:
            conn._max_snd_wnd = window
    if advance:
        sndbuf = conn._sndbuf
        start = conn._sndbuf_start
        trim = min(ack, start + len(sndbuf)) - start
        if trim > 0:
            sndbuf.consume(trim)
            conn._sndbuf_start = start + trim
        snd_nxt = conn._snd_nxt
        flight_before = snd_nxt - snd_una
        conn._snd_una = ack
        if snd_nxt < ack:
            conn._snd_nxt = ack
        if conn._high_rxt < ack:
            conn._high_rxt = ack
        if ts_ok and ts is not None and ts[1]:
            sample = ((conn._ts_now(now) - ts[1]) & _MASK32) / 1000.0
            if sample < 60.0:
                conn._rtt_sample(sample)
            conn._rtt_seq = None
        else:
            rtt_seq = conn._rtt_seq
            if rtt_seq is not None and ack > rtt_seq:
                conn._rtt_sample(now - conn._rtt_time)
                conn._rtt_seq = None
        conn._retries = 0
        mss = conn._snd_mss  # TcpBase._send_mss()
        cwnd = conn._cwnd
        if flight_before + mss >= cwnd:  # cwnd-limited: grow
            if cwnd < conn._ssthresh:
                cwnd += min(advance, 2 * mss)
            else:
                cwnd = conn._cc.on_ack(cwnd, advance, mss, now, conn._srtt or 0.0)
            conn._cwnd = min(cwnd, 2 * conn.config.send_buffer)
        conn._rto_deadline = None if ack >= snd_max else now + conn._rto
        conn._tlp_out = False
        conn._arm_tail_loss_probe(now)
        if conn._send_blocked and conn.send_buffer_space > 0:
            conn._send_blocked = False
            conn._emit(_ev.SendSpaceAvailable())
    if ts_ok and ts is not None and rcv_nxt <= conn._last_ack_sent:
        if (ts[0] - conn._ts_recent) & _MASK32 < 0x80000000:
            conn._ts_recent = ts[0]
        if size and ts[1]:
            sample = ((conn._ts_now(now) - ts[1]) & _MASK32) / 1000.0
            if sample < 60.0:
                prev = conn._rcv_rtt
                conn._rcv_rtt = sample if prev is None else min(prev, sample) * 0.9 + sample * 0.1
    if size:
        conn._rcv_nxt = rcv_nxt + size
        if not conn._discard_input:
            rcvbuf = conn._rcvbuf
            if not rcvbuf:
                conn._emit(_ev.DataAvailable())
            rcvbuf += payload
        pending = conn._ack_pending + 1
        conn._ack_pending = pending
        quickack = conn._quickack
        if pending >= 2 or quickack > 0:
            conn._ack_now = True
        elif conn._ack_deadline is None:
            conn._ack_deadline = now + conn.config.delayed_ack
        if quickack > 0:
            conn._quickack = quickack - 1
        conn._autotune(now)
    return True


def tcp_receive_run(
    packets: list[bytes],
    start: int,
    now: float,
    local: frozenset[bytes],
    conns: dict[Any, Any],
    dirty: dict[Any, None],
    fast_states: frozenset[Any],
    segment_type: Any,
) -> tuple[int, tuple[bytes, bytes, Any] | None]:
    """Received packets ``packets[start:]`` through the established-state path, in
    order, up to the first one it does not take; the twin of ``_fast.tcp_receive_run``
    (which parses into a C struct and builds a segment only for a packet it declines).

    A packet is taken when it is a TCP segment of a connection in ``fast_states``
    (keyed in ``conns`` by ``(local address, local port, remote address, remote
    port)``, the local address in ``local``) that ``tcp_receive_established`` handled
    in full; the connection is then marked in ``dirty``.  Returns ``(index, parsed)``:
    the index of the first packet not taken (``len(packets)`` when all were) and what
    ``parse_tcp_packet`` made of it -- ``(src, dst, segment)`` for the general path, or
    None when it is not well-formed TCP (or when all were taken).
    """
    n = len(packets)
    for i in range(start, n):
        parsed = parse_tcp_packet(packets[i], segment_type)
        if parsed is None:
            return i, None
        src, dst, segment = parsed
        if dst not in local:
            return i, parsed
        conn = conns.get((dst, segment.dst_port, src, segment.src_port))
        if (
            conn is None
            or conn.state not in fast_states
            or not tcp_receive_established(conn, segment, now)
        ):
            return i, parsed
        dirty[conn] = None
    return n, None


def tcp_send_run(
    conn: Any,
    template: Any,
    out: list[Any],
    pipe: int,
    data_end: int,
    fin: int | None,
    mss: int,
    limit: int,
    now: float,
    wire: tuple[bytes, bytes] | None,
) -> tuple[int, int]:
    """New data segments modelled on ``template`` (the first data segment of this
    ``_transmit`` call: the same ACK fields) appended to ``out`` for as long as
    ``_transmit``'s template branch applies, at most ``limit``, as TcpSegments or, when
    ``wire`` is ``(source, destination)``, as their IP packets; returns ``(segments,
    pipe)``.  Stops, changing nothing for that segment, at the first one the branch
    would not send: no congestion or peer window left, sender SWS avoidance, old data
    (after an RTO), our FIN, or the end of the data.  The twin of
    ``_fast.tcp_send_run``, which reads the send buffer's chunks directly.
    """
    count = 0
    sndbuf = conn._sndbuf
    while count < limit:
        room = conn._cwnd - pipe
        if room <= 0:
            break
        nxt = conn._snd_nxt
        usable = min(conn._snd_una + conn._snd_wnd - nxt, room)
        avail = data_end - nxt
        if avail <= 0:
            break
        length = min(avail, mss, usable)
        if length <= 0:
            break
        if length < mss and length < avail and (room < mss or length < conn._max_snd_wnd // 2):
            break
        end = nxt + length
        if nxt < conn._snd_max or end == fin:
            break
        segment = type(template)(
            template.src_port,
            template.dst_port,
            (conn._iss + nxt) & _MASK32,
            template.ack,
            _ACK | _PSH if end == data_end else _ACK,
            template.window,
            sndbuf.peek(nxt - conn._sndbuf_start, length),
            None,
            None,
            False,
            template.timestamp,
            template.sack_blocks,
        )
        out.append(segment if wire is None else build_tcp_packet(segment, *wire))
        conn._snd_nxt = end
        conn._ack_now = False  # as _segment: new data carries our ACK
        conn._ack_pending = 0
        conn._ack_deadline = None
        conn._tlp_new_data = False
        conn._persist_deadline = None
        conn._persist_backoff = 0
        if conn._rtt_seq is None and not conn._ts_ok:
            conn._rtt_seq = conn._snd_max
            conn._rtt_time = now
        conn._snd_max = end
        if conn._rto_deadline is None:
            conn._rto_deadline = now + conn._rto
        pipe += length
        count += 1
    return count, pipe
