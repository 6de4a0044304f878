"""The access log (``common/relay/accesslog.py``): lines that survive hostile values,
rotation, and what the gateway writes for HTTP requests and raw TCP/UDP flows; then the
fail2ban filter and the CrowdSec parser in ``deploy/`` against lines the gateway wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from common.passwords import hash_password
from common.protocol import AccessPolicy, SessionKey
from common.relay.accesslog import AccessLog, AccessLogSettings, logfmt
from common.relay.router import Router
from common.relay.tcp import TcpForwarder, TcpSettings
from common.relay.udp import UdpForwarder, UdpSettings
from gateway.access.policy import AccessControl
from gateway.proxy import LimitSettings
from tests.gateway.agentapp import ProxyHarness, Uvicorn, tunnel
from tests.support import free_port, need_binary

REPO = Path(__file__).resolve().parents[2]
HOSTILE = ["a b", 'x"y', "p=q", "line\nbreak", "tab\there", "back\\slash", "caf\u00e9", "\x00\x7f"]


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader (the inverse of ``accesslog.logfmt``)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        key_end = line.index("=", pos)
        key = line[pos:key_end]
        pos = key_end + 1
        if line[pos] == '"':
            pos += 1
            value = []
            while line[pos] != '"':
                if line[pos] == "\\":
                    nxt = line[pos + 1]
                    if nxt == "x":
                        value.append(chr(int(line[pos + 2 : pos + 4], 16)))
                        pos += 4
                    elif nxt == "u":
                        value.append(chr(int(line[pos + 2 : pos + 6], 16)))
                        pos += 6
                    else:
                        value.append(nxt)
                        pos += 2
                else:
                    value.append(line[pos])
                    pos += 1
            pos += 1
            out[key] = "".join(value)
        else:
            end = line.find(" ", pos)
            end = len(line) if end < 0 else end
            out[key] = line[pos:end]
            pos = end
        assert pos == len(line) or line[pos] == " ", line
        pos += 1
    return out


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_hostile_values_stay_inside_their_field(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "access.log"
    access_log = AccessLog(AccessLogSettings(str(path), fmt, flush_interval=3600))
    for value in HOSTILE:
        access_log.http(
            client="203.0.113.5",
            tunnel="t1",
            host=value,
            method="GET",
            path="/" + value,
            status=200,
            bytes_in=1,
            bytes_out=2,
            duration=0.001,
            upstream="100.64.0.100",
            decision="allow",
            user=value,
        )
    access_log.shutdown()
    lines = path.read_text().splitlines()
    assert len(lines) == len(HOSTILE)
    for value, line in zip(HOSTILE, lines, strict=True):
        record = json.loads(line) if fmt == "json" else parse_logfmt(line)
        assert (record["host"], record["path"], record["user"]) == (value, "/" + value, value)
        assert record["decision"] == "allow" and str(record["status"]) == "200"


def test_plain_values_stay_bare() -> None:
    assert logfmt({"a": "x", "b": 1, "c": -1.5, "d": True}) == "a=x b=1 c=-1.5 d=true"


def test_rotation_and_a_file_moved_away(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access_log = AccessLog(AccessLogSettings(str(path), max_bytes=4096, backups=2))
    for n in range(200):
        access_log.write({"n": n, "pad": "x" * 80})
        access_log.flush()  # as the timer would, between requests
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["access.log", "access.log.1", "access.log.2"], names
    assert all(p.stat().st_size <= 4096 + 4096 for p in tmp_path.iterdir())
    # logrotate moves the file: the next flush writes a new one where it was
    os.replace(path, tmp_path / "moved.log")
    access_log.write({"after": "move"})
    access_log.shutdown()
    assert "after=move" in path.read_text()


def test_a_failing_disk_never_stops_serving(tmp_path: Path) -> None:
    access_log = AccessLog(AccessLogSettings(str(tmp_path / "missing-dir" / "access.log")))
    access_log.write({"a": 1})
    access_log.shutdown()
    assert access_log.failed_writes == 1


# -- what the gateway writes ------------------------------------------------------------


async def http_lines(tmp_path: Path) -> list[str]:
    """A real ProxyServer with the access log on: an allowed request, a request with a
    token in its query, an unknown host, an IP-refused one, a wrong PIN."""
    log_path = tmp_path / "access.log"
    agent = await Uvicorn().start()
    harness = ProxyHarness(
        agent.port,
        limits=LimitSettings(rate=0),
        access_log=AccessLogSettings(str(log_path), flush_interval=0.05),
    )
    harness.router.replace_all(
        [
            tunnel("t1", "app.example.com"),
            tunnel("t2", "shut.example.com"),
            tunnel("t3", "pin.example.com"),
        ]
    )
    harness.proxy.access.update(
        (
            AccessPolicy("t2", 1, ip_deny=("127.0.0.0/8",)),
            AccessPolicy("t3", 1, password_hash=hash_password("2468")),
        ),
        (SessionKey("k", b"k" * 32),),
    )
    await harness.start()
    try:
        async with httpx.AsyncClient(base_url=harness.url, timeout=10) as http:
            ok = await http.get("/headers?token=s3cret", headers={"Host": "app.example.com"})
            assert ok.status_code == 200
            await http.get("/", headers={"Host": "nope.example"})
            # a Host with a space and a quote: logged quoted, parsers must take it whole
            await http.get("/", headers={"Host": 'odd "host" x'})
            assert (await http.get("/", headers={"Host": "shut.example.com"})).status_code == 403
            page = await http.get("/.kakuremichi/login", headers={"Host": "pin.example.com"})
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf is not None
            wrong = await http.post(
                "/.kakuremichi/login",
                headers={"Host": "pin.example.com", "Cookie": f"kkm_csrf={csrf[1]}"},
                data={"csrf": csrf[1], "password": "0000"},
            )
            assert wrong.status_code == 401
    finally:
        await harness.close()
        await agent.stop()
    return log_path.read_text().splitlines()


async def test_http_requests_are_logged_with_their_decision(tmp_path: Path) -> None:
    lines = await http_lines(tmp_path)
    records = [parse_logfmt(line) for line in lines]
    assert not any("s3cret" in line for line in lines)
    by_decision = {r["decision"]: r for r in records}
    allowed = by_decision["allow"]
    assert allowed["host"] == "app.example.com" and allowed["path"] == "/headers"
    assert allowed["status"] == "200" and allowed["client"] == "127.0.0.1"
    assert allowed["upstream"] == "127.0.0.1" and int(allowed["bytes_out"]) > 100
    assert float(allowed["duration_ms"]) >= 0 and int(allowed["bytes_in"]) > 20
    assert by_decision["no_route"]["status"] == "404"
    assert by_decision["deny_ip"]["status"] == "403"
    assert by_decision["bad_password"]["status"] == "401"
    assert by_decision["bad_password"]["path"] == "/.kakuremichi/login"


async def flow_lines(tmp_path: Path) -> list[str]:
    """Raw TCP and UDP tunnels with IP rules: one allowed and one refused flow each."""
    log_path = tmp_path / "flows.log"
    access_log = AccessLog(AccessLogSettings(str(log_path), flush_interval=0.05))
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    udp_echo, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        _UdpEcho, local_addr=("127.0.0.1", 0)
    )
    udp_echo_port = udp_echo.get_extra_info("sockname")[1]
    tcp_open, tcp_shut, udp_open, udp_shut = (free_port() for _ in range(4))
    router = Router()
    router.replace_all(
        [
            tunnel("to", None, protocol="tcp", public_port=tcp_open),
            tunnel("ts", None, protocol="tcp", public_port=tcp_shut),
            tunnel("uo", None, protocol="udp", public_port=udp_open),
            tunnel("us", None, protocol="udp", public_port=udp_shut),
        ]
    )
    access = AccessControl()
    access.update(
        (
            AccessPolicy("ts", 1, ip_allow=("10.0.0.0/8",)),
            AccessPolicy("us", 1, ip_deny=("::/0", "0.0.0.0/0")),
        ),
        (),
    )
    tcp = TcpForwarder(
        router,
        settings=TcpSettings(bind_host="127.0.0.1", upstream_port=echo_port),
        admit=access.ip_allowed,
        access_log=access_log,
    )
    udp = UdpForwarder(
        router,
        settings=UdpSettings(
            bind_host="127.0.0.1", upstream_port=udp_echo_port, flow_idle_timeout=0.2
        ),
        admit=access.ip_allowed,
        access_log=access_log,
    )
    await tcp.start()
    await udp.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_open)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_shut)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            writer.write(b"ping")
            await reader.readexactly(4)  # refused: reset, never echoed
        writer.close()
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[bytes] = asyncio.Queue()
        client, _ = await loop.create_datagram_endpoint(
            lambda: _Collect(got), remote_addr=("127.0.0.1", udp_open)
        )
        client.sendto(b"hello")
        assert await asyncio.wait_for(got.get(), 5) == b"hello"
        shut, _ = await loop.create_datagram_endpoint(
            lambda: _Collect(got), remote_addr=("127.0.0.1", udp_shut)
        )
        for _ in range(5):
            shut.sendto(b"nope")
        await asyncio.sleep(0.6)  # the allowed flow idles out and is logged
        assert got.empty()
        client.close()
        shut.close()
    finally:
        await tcp.close()
        await udp.close()
        echo.close()
        udp_echo.close()
        await access_log.close()
    return log_path.read_text().splitlines()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read(100)
    writer.write(data)
    await writer.drain()
    writer.close()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class _Collect(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[bytes]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


async def test_raw_tunnels_apply_ip_rules_and_log_each_flow(tmp_path: Path) -> None:
    records = [parse_logfmt(line) for line in await flow_lines(tmp_path)]
    by = {(r["protocol"], r["tunnel"]): r for r in records}
    assert by[("tcp", "to")]["decision"] == "allow"
    assert int(by[("tcp", "to")]["bytes_in"]) == 4 == int(by[("tcp", "to")]["bytes_out"])
    assert by[("tcp", "ts")]["decision"] == "deny_ip"
    assert by[("udp", "uo")]["decision"] == "allow" and by[("udp", "uo")]["bytes_in"] == "5"
    refused = [r for r in records if (r["protocol"], r["tunnel"]) == ("udp", "us")]
    assert len(refused) == 1 and refused[0]["decision"] == "deny_ip"  # once, not per datagram


# -- fail2ban and CrowdSec against real lines ---------------------------------------------

FAILURES = {"bad_password", "deny_ip"}


async def test_the_fail2ban_filter_matches_exactly_the_failures(tmp_path: Path) -> None:
    fail2ban_regex = need_binary("fail2ban-regex")
    lines = await http_lines(tmp_path) + await flow_lines(tmp_path)
    # a client that writes a failing decision into its own path must not match
    lines.append(
        logfmt(
            {
                "time": "2026-12-06T13:20:05.123Z",
                "protocol": "http",
                "client": "198.51.100.3",
                "tunnel": "t1",
                "host": "app.example.com",
                "method": "GET",
                "path": "/x status=401 bytes_in=1 bytes_out=1 duration_ms=1 upstream=x "
                "decision=bad_password",
                "status": 200,
                "bytes_in": 10,
                "bytes_out": 10,
                "duration_ms": 1.0,
                "upstream": "100.64.0.100",
                "decision": "allow",
                "user": "-",
            }
        )
    )
    log_file = tmp_path / "all.log"
    log_file.write_text("\n".join(lines) + "\n")
    filter_file = REPO / "deploy" / "fail2ban" / "filter.d" / "kakuremichi.conf"
    done = subprocess.run(
        [fail2ban_regex, "--print-all-matched", str(log_file), str(filter_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    expected = [line for line in lines if parse_logfmt(line)["decision"] in FAILURES]
    assert len(expected) >= 3
    summary = re.search(r"Lines: (\d+) lines, (\d+) ignored, (\d+) matched", done.stdout)
    assert summary is not None, done.stdout
    assert (int(summary[1]), int(summary[3])) == (len(lines), len(expected)), done.stdout
    section = done.stdout.split("Matched line(s):", 1)[1].split("Missed line(s):", 1)[0]
    matched = [m.strip() for m in re.findall(r"^\|\s+(time=.*)$", section, re.M)]
    assert sorted(matched) == sorted(expected)


_GROK = {
    "TIMESTAMP_ISO8601": r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?",
    "IP": r"[0-9A-Fa-f:.]+",
    "NOTSPACE": r"\S+",
    "WORD": r"\b\w+\b",
    "INT": r"[+-]?\d+",
    "NUMBER": r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)",
}


def _grok_to_re(pattern: str, custom: dict[str, str]) -> re.Pattern[str]:
    definitions = {**_GROK, **custom}

    def expand(match: re.Match[str]) -> str:
        name, field = match[1], match[2]
        return f"(?P<{field}>{definitions[name]})"

    return re.compile(re.sub(r"%\{(\w+):(\w+)\}", expand, pattern))


async def test_the_crowdsec_parser_reads_every_line_the_gateway_writes(tmp_path: Path) -> None:
    """CrowdSec itself cannot be installed here (its Debian package fetches the hub from
    the internet at install time), so this expands the parser's grok patterns with
    grok's standard definitions and checks them against the gateway's real lines."""
    parser = yaml.safe_load(
        (REPO / "deploy/crowdsec/parsers/s01-parse/kakuremichi-access.yaml").read_text()
    )
    patterns = [
        _grok_to_re(n["grok"]["pattern"], parser["pattern_syntax"]) for n in parser["nodes"]
    ]
    lines = await http_lines(tmp_path) + await flow_lines(tmp_path)
    for line in lines:
        matches = [m for m in (p.match(line) for p in patterns) if m is not None]
        assert len(matches) == 1, line
        fields = matches[0].groupdict()
        record = parse_logfmt(line)
        assert fields["source_ip"] == record["client"]
        assert fields["decision"] == record["decision"]
    scenario = yaml.safe_load((REPO / "deploy/crowdsec/scenarios/kakuremichi-bf.yaml").read_text())
    assert "bad_password" in scenario["filter"] and scenario["groupby"] == "evt.Meta.source_ip"
