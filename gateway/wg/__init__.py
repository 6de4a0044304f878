"""WireGuard backends of the gateway: kernel, wireguard-go, and our user-space stack.

All of them take the same desired state (:class:`WgState`) and reconcile the
interface to it; they differ only in how the device exists.
"""
