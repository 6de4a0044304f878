"""kakuremichi agent: the rootless connector (user-space WireGuard + TCP/IP, local forwarding)."""
