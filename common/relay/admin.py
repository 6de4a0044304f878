"""The admin listener of the gateway and the agent: ``/metrics`` (Prometheus), ``/livez``,
``/readyz`` and ``/healthz``.

Theory of operation
-------------------
A deliberately tiny HTTP/1.1 server on plain asyncio + h11: read one request head
(5 s deadline, 8 KiB limit), answer, close.  ``/metrics`` renders the registry;
``/healthz`` reads the program's :class:`~common.health.Health` (named parts, each
ok / degraded / down with a reason) and answers 200 unless a part is down (then 503),
with a JSON body ``{"status": …, "parts": {name: {"state": …, "reason": …}}}``.
``/readyz`` is the same verdict under the name orchestrators use for "send it
traffic" (an agent waiting for its first gateway handshake is not ready); ``/livez``
answers 200 whenever the event loop serves it at all ("do not restart me": a
program waiting for Control or a gateway is alive), so a liveness probe never restarts
a program that is only waiting.  It binds wherever the caller says; keep it on loopback or a private address, since
metrics reveal tunnel ids and traffic volumes and the health reasons name peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import h11

from common.health import Health

from .metrics import CONTENT_TYPE, Metrics
from .splice import close_writer

log = logging.getLogger(__name__)


class AdminServer:
    """Serves ``GET /metrics`` and ``GET /healthz`` on an admin port."""

    def __init__(self, metrics: Metrics, health: Health | None = None) -> None:
        self.metrics = metrics
        self.health = health
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> asyncio.Server:
        self._server = await asyncio.start_server(self._serve, host, port)
        return self._server

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=8192)
        try:
            async with asyncio.timeout(5.0):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(8192))
                        continue
                    break
        except (TimeoutError, ConnectionError, OSError, h11.RemoteProtocolError):
            await self._respond(writer, conn, 400, b"bad request\n", b"text/plain")
            await close_writer(writer)
            return
        if not isinstance(event, h11.Request):
            await close_writer(writer)
            return
        path = event.target.split(b"?", 1)[0]
        if event.method not in (b"GET", b"HEAD"):
            status, body, ctype = 405, b"method not allowed\n", b"text/plain"
        elif path == b"/metrics":
            status, body, ctype = 200, self.metrics.render().encode(), CONTENT_TYPE.encode()
        elif path in (b"/healthz", b"/readyz"):
            report = (self.health or Health()).report()
            status, body, ctype = report.http_status, report.to_json(), b"application/json"
        elif path == b"/livez":
            status, body, ctype = 200, b'{"status": "alive"}\n', b"application/json"
        else:
            status, body, ctype = 404, b"not found\n", b"text/plain"
        if event.method == b"HEAD":
            body = b""
        await self._respond(writer, conn, status, body, ctype)
        await close_writer(writer)

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter, conn: h11.Connection, status: int, body: bytes, ctype: bytes
    ) -> None:
        headers = [
            (b"content-type", ctype),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        with contextlib.suppress(Exception):
            data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            data += conn.send(h11.Data(data=body)) or b"" if body else b""
            data += conn.send(h11.EndOfMessage()) or b""
            writer.write(data)
            await asyncio.wait_for(writer.drain(), 5.0)
