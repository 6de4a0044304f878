"""netstack: sans-IO WireGuard and a user-space IPv4/IPv6 + TCP/UDP/ICMP stack.

Where things are:

* ``ip``, ``tcpwire``, ``udp``, ``icmp`` -- wire formats (checked parsers, builders).
* ``tcp`` -- the TCP connection state machine (sans-IO); ``events`` -- its events.
* ``stack`` -- ``Stack``: packets and time in, packets and events out, one deadline.
* ``aio`` -- asyncio adapter: streams, servers and datagram endpoints over any
  ``PacketLink``; ``tun`` -- a TUN device as a ``PacketLink``.
* ``speedups`` -- picks the Cython hot path ``_fast`` or its pure twin ``_pure``
  (``KAKUREMICHI_NETSTACK_PURE=1`` forces the twin).
* ``wireguard`` -- the WireGuard protocol (its own package).
"""
