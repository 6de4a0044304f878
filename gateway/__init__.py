"""kakuremichi gateway: the public edge (HTTP/HTTPS routed by Host through WireGuard)."""
