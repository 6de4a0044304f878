"""netstack: sans-IO WireGuard and a user-space IPv4/IPv6 + TCP/UDP/ICMP stack."""
