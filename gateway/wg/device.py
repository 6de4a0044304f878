"""Kernel WireGuard and wireguard-go, both driven through ``wg`` and ``ip``.

Theory of operation
-------------------
Both implementations expose the same interface, configured through the same UAPI
(``wg set``/``wg show``), so one class serves both; they differ only in how the device
is created: ``ip link add … type wireguard`` for the kernel module, or a
``wireguard-go -f <name>`` child process (TUN-backed) where the module is missing.
``auto`` tries the kernel first and falls back to wireguard-go.

``apply(state)`` reconciles the interface to the desired :class:`WgState`: it reads the
current peers (``wg show <if> dump``) and addresses (``ip -j addr``), then removes,
adds or updates only what differs, so one agent joining never disturbs the sessions of
the others.  The private key reaches ``wg`` on its standard input, never a command line or a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shutil

from common.keys import KeyPair
from common.logs import kv
from gateway.wg.state import PeerStats, WgState

log = logging.getLogger("gateway.wg")


class WgError(Exception):
    """A WireGuard or ip command failed; the message says which and why."""


CAP_NET_ADMIN = 12  # linux/capability.h


def has_net_admin(status_file: str = "/proc/self/status") -> bool:
    """Whether this process may create and configure network interfaces: CAP_NET_ADMIN
    in its effective set (root in a container without it has not; a systemd
    ``DynamicUser`` with ``AmbientCapabilities=CAP_NET_ADMIN`` has).  Where the
    capability sets cannot be read, root is taken to have it."""
    try:
        with open(status_file, encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


async def run(*argv: str, check: bool = True, input_text: str | None = None) -> str:
    """Run a command; ``input_text`` (small: a key) is its standard input.

    The input goes through an ``os.pipe()`` filled before the child starts, not
    ``stdin=PIPE``: under uvloop that is a socketpair, which ``wg``'s
    ``fopen("/dev/stdin")`` cannot open (ENXIO), and uvloop's ``communicate()`` raises
    instead of ignoring a child that exited before reading its input.
    """
    stdin: int = asyncio.subprocess.DEVNULL
    if input_text is not None:
        data = input_text.encode()
        if len(data) > select.PIPE_BUF:
            raise ValueError("input_text must fit in one pipe write")
        stdin, write_end = os.pipe()
        try:
            os.write(write_end, data)
        finally:
            os.close(write_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    finally:
        if input_text is not None:
            os.close(stdin)
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise WgError(
            f"{' '.join(argv[:4])}…: {err.decode(errors='replace').strip() or proc.returncode}"
        )
    return out.decode(errors="replace")


class InterfaceBackend:
    """A WireGuard interface (kernel module or wireguard-go) driven through ``wg`` and ``ip``."""

    def __init__(
        self,
        name: str,
        keys: KeyPair,
        listen_port: int,
        mode: str = "auto",
        netns: str | None = None,
    ) -> None:
        if mode not in ("auto", "kernel", "wireguard-go"):
            raise ValueError(f"unknown WireGuard mode {mode!r}")
        if not 1 <= len(name) <= 15:
            raise ValueError("interface names are 1-15 characters")
        self.name = name
        self.keys = keys
        self.listen_port = listen_port
        self.mode = mode
        self.netns = netns
        self.kind = ""
        self._process: asyncio.subprocess.Process | None = None
        self._applied: WgState | None = None

    def _cmd(self, *argv: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.netns, *argv) if self.netns else argv

    async def _exists(self) -> bool:
        out = await run(*self._cmd("ip", "-j", "link", "show", "dev", self.name), check=False)
        return bool(out.strip()) and out.strip() != "[]"

    async def start(self) -> None:
        if self.mode in ("auto", "kernel"):
            try:
                await run(*self._cmd("ip", "link", "add", "dev", self.name, "type", "wireguard"))
                self.kind = "kernel"
            except WgError as exc:
                if self.mode == "kernel":
                    raise WgError(f"kernel WireGuard unavailable: {exc}") from exc
                log.info(
                    "kernel WireGuard unavailable, using wireguard-go", extra=kv(reason=str(exc))
                )
        if not self.kind:
            binary = shutil.which("wireguard-go")
            if binary is None:
                raise WgError("neither the kernel module nor wireguard-go is available")
            env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
            self._process = await asyncio.create_subprocess_exec(
                *self._cmd(binary, "-f", self.name),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            for _ in range(200):
                socket_path = f"/var/run/wireguard/{self.name}.sock"
                if await self._exists() and await asyncio.to_thread(os.path.exists, socket_path):
                    break
                if self._process.returncode is not None:
                    err = (
                        (await self._process.stderr.read()).decode() if self._process.stderr else ""
                    )
                    raise WgError(f"wireguard-go exited: {err.strip()}")
                await asyncio.sleep(0.025)
            else:
                raise WgError("wireguard-go did not create the interface")
            self.kind = "wireguard-go"
        await run(
            *self._cmd(
                "wg",
                "set",
                self.name,
                "listen-port",
                str(self.listen_port),
                "private-key",
                "/dev/stdin",
            ),
            input_text=self.keys.private_b64 + "\n",
        )
        await run(*self._cmd("ip", "link", "set", "dev", self.name, "mtu", "1420", "up"))
        log.info(
            "WireGuard interface up",
            extra=kv(interface=self.name, backend=self.kind, port=self.listen_port),
        )

    async def stop(self) -> None:
        with contextlib.suppress(WgError):
            await run(*self._cmd("ip", "link", "del", "dev", self.name), check=False)
        if self._process is not None:
            if self._process.returncode is None:
                self._process.terminate()
                try:
                    await asyncio.wait_for(self._process.wait(), 5)
                except TimeoutError:
                    self._process.kill()
                    await self._process.wait()
            self._process = None

    async def _current_peers(self) -> dict[str, tuple[str, ...]]:
        out = await run(*self._cmd("wg", "show", self.name, "dump"))
        peers: dict[str, tuple[str, ...]] = {}
        for line in out.splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) >= 4:
                allowed = () if fields[3] == "(none)" else tuple(sorted(fields[3].split(",")))
                peers[fields[0]] = allowed
        return peers

    async def _current_addresses(self) -> set[str]:
        out = await run(*self._cmd("ip", "-j", "addr", "show", "dev", self.name))
        found = set()
        for link in json.loads(out or "[]"):
            for info in link.get("addr_info", []):
                if info.get("family") in ("inet", "inet6") and info.get("scope") != "link":
                    found.add(f"{info['local']}/{info['prefixlen']}")
        return found

    async def apply(self, state: WgState) -> None:
        """Reconcile peers and addresses to ``state``; touch only what differs."""
        current = await self._current_peers()
        wanted = {p.public_key: p.allowed_ips for p in state.peers}
        for key in current.keys() - wanted.keys():
            await run(*self._cmd("wg", "set", self.name, "peer", key, "remove"))
            log.info("removed WireGuard peer", extra=kv(interface=self.name, peer=key))
        for peer in state.peers:
            if current.get(peer.public_key) != peer.allowed_ips:
                await run(
                    *self._cmd(
                        "wg",
                        "set",
                        self.name,
                        "peer",
                        peer.public_key,
                        "allowed-ips",
                        ",".join(peer.allowed_ips),
                    )
                )
                log.info(
                    "configured WireGuard peer",
                    extra=kv(
                        interface=self.name,
                        peer=peer.public_key,
                        agent=peer.name,
                        allowed=",".join(peer.allowed_ips),
                    ),
                )
        have = await self._current_addresses()
        for address in have - set(state.addresses):
            await run(*self._cmd("ip", "addr", "del", address, "dev", self.name), check=False)
        for address in sorted(set(state.addresses) - have):
            await run(*self._cmd("ip", "addr", "add", address, "dev", self.name))
        self._applied = state

    async def stats(self) -> list[PeerStats]:
        out = await run(*self._cmd("wg", "show", self.name, "dump"))
        result = []
        for line in out.splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) >= 7:
                endpoint = None if fields[2] == "(none)" else fields[2]
                result.append(
                    PeerStats(fields[0], endpoint, float(fields[4]), int(fields[5]), int(fields[6]))
                )
        return result
