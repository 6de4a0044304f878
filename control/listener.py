"""What Control's listener allows a connection before its request head is complete.

Theory of operation
-------------------
uvicorn bounds the wait *between* requests on a keep-alive connection
(``timeout_keep_alive``) but not the wait *for* one: a client that connects and sends
nothing, or a request line and a few header bytes, holds its socket for as long as it
likes, on the REST API and on the WebSocket hub alike (the hub's own deadlines start
only once an upgrade request has arrived).  :class:`HeadDeadline` wraps the HTTP
protocol uvicorn would use (``http="auto"``) around each connection and adds:

* **a deadline**: the first request head on a connection must be complete within
  ``head_timeout`` seconds of the connection, a later one within ``head_timeout``
  seconds of its first byte (the idle time before that byte is uvicorn's keep-alive
  timeout).  Past it the connection is closed: silently if nothing of the head has
  arrived, after a ``408`` (RFC 9110 §15.5.9) if part of one has.  Once a head is
  complete, a request body and a WebSocket are the application's business.
* **a cap**: an address (IPv6: its /64) may hold at most ``per_address`` connections
  whose first request head is not complete yet; one more is answered ``429`` with
  ``Retry-After`` and closed at once, before anything is read from it.

Closed and refused connections are logged once per address per ``log_interval``
seconds, with the number not logged since the previous line.

The head is complete once the wrapped protocol has started a request cycle (its
``cycle`` attribute holds one whose response is not complete) or has handed the
transport to a WebSocket protocol (``transport.get_protocol()`` is no longer the
wrapper).  Both of uvicorn's HTTP/1.1 protocols, h11 and httptools, keep ``cycle``;
the tests run the listener over both, so a uvicorn that changes it fails them.

The rules' state (the per-address counts, the log limiters) lives in one
:class:`HeadRules` per server; :func:`protocol_class` binds it into the class uvicorn
is given as its ``http`` protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from common.logs import OncePer, kv
from control.ws.admission import PendingAuth, address_key

log = logging.getLogger("control.listener")

#: seconds a connection has to complete a request head (``--request-head-timeout``)
DEFAULT_HEAD_TIMEOUT = 10.0
#: connections one address may hold before their first request head is complete
#: (``--max-pre-request-per-address``)
DEFAULT_PRE_REQUEST_PER_ADDRESS = 128
#: a line per address per this many seconds for closed or refused connections
LOG_INTERVAL = 60.0
#: addresses the log limiter tracks at once
_LOG_ADDRESSES = 4096
#: what a refused client is told to wait (seconds)
_RETRY_AFTER = 5


def _response(status: int, reason: str, code: str, message: str, *extra: str) -> bytes:
    """A complete ``Connection: close`` response in the REST API's error shape."""
    body = json.dumps({"error": {"code": code, "message": message, "details": []}}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class HeadRules:
    """The listener's limits and the per-address state they keep (one per server)."""

    def __init__(
        self,
        head_timeout: float = DEFAULT_HEAD_TIMEOUT,
        per_address: int = DEFAULT_PRE_REQUEST_PER_ADDRESS,
        log_interval: float = LOG_INTERVAL,
    ) -> None:
        if not head_timeout > 0:
            raise ValueError("head_timeout must be > 0 seconds")
        self.head_timeout = head_timeout
        #: connections whose first request head is not complete, per address
        self.pending = PendingAuth(per_address, log_interval)
        self.expired = OncePer(log_interval, _LOG_ADDRESSES)
        self.timed_out = _response(
            408,
            "Request Timeout",
            "request_timeout",
            f"the request head was not complete within {head_timeout:g} s",
        )
        self.refused = _response(
            429,
            "Too Many Requests",
            "too_many_connections",
            f"more than {per_address} connections from this address have not sent a "
            "request yet; send one or retry later",
            f"retry-after: {_RETRY_AFTER}",
        )


class HeadDeadline(asyncio.Protocol):
    """One connection: uvicorn's HTTP protocol (``inner``) under the head deadline and
    the per-address cap.  One timer per connection, armed while a head is awaited."""

    def __init__(
        self, inner: asyncio.Protocol, rules: HeadRules, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.inner = inner
        self.rules = rules
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        #: the inner protocol has seen the connection (not refused at the door)
        self.admitted = False
        #: holding one of the address's pre-request slots
        self.counted = False
        self.timer: asyncio.TimerHandle | None = None
        #: bytes of the awaited head have arrived
        self.partial = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass, only alike)
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else None
        self.address = address_key(host if isinstance(host, str) else None)
        if not self.rules.pending.enter(self.address):
            refused = self.rules.pending.refused(self.address, self.loop.time())
            if refused is not None:
                log.warning(
                    "refusing connections over the per-address cap on ones without a request",
                    extra=kv(
                        address=self.address, cap=self.rules.pending.per_address, refused=refused
                    ),
                )
            transport.write(self.rules.refused)
            transport.close()
            return
        self.counted = True
        self.admitted = True
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        if self.timer is None and self._awaiting_head():
            self._arm()  # the first byte of a later request on a kept-alive connection
        if data:
            self.partial = True
        self.inner.data_received(data)
        if self.timer is not None and not self._awaiting_head():
            self._head_complete()

    def eof_received(self) -> bool | None:
        if not self.admitted:
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_complete()
        if self.admitted:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()

    # -- the deadline -----------------------------------------------------------------

    def _awaiting_head(self) -> bool:
        """No request is being served and the transport is still HTTP's."""
        assert self.transport is not None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return False  # closing, or upgraded to a WebSocket
        cycle = getattr(self.inner, "cycle", None)
        return cycle is None or bool(cycle.response_complete)

    def _arm(self) -> None:
        self.partial = False
        self.timer = self.loop.call_later(self.rules.head_timeout, self._expired)

    def _head_complete(self) -> None:
        """A head arrived (or the connection went): stop the clock, free the slot."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted:
            self.counted = False
            self.rules.pending.leave(self.address)

    def _expired(self) -> None:
        self.timer = None
        assert self.transport is not None
        if not self._awaiting_head():
            return
        due, unlogged = self.rules.expired.due(self.address, self.loop.time())
        if due:
            log.info(
                "closing connection that did not complete a request head in time",
                extra=kv(
                    address=self.address,
                    timeout_s=self.rules.head_timeout,
                    partial=self.partial,
                    since_last_logged=unlogged,
                ),
            )
        if self.partial:
            self.transport.write(self.rules.timed_out)
        self.transport.close()


def protocol_class(
    rules: HeadRules, inner: type[asyncio.Protocol] = AutoHTTPProtocol
) -> type[asyncio.Protocol]:
    """The class to give uvicorn as its ``http`` protocol: per connection it builds
    ``inner`` (uvicorn's own, h11 or httptools) as uvicorn would and wraps it."""

    class BoundHeadDeadline(HeadDeadline):
        def __init__(
            self,
            config: Any,
            server_state: Any,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            protocol = inner(  # type: ignore[call-arg]
                config=config, server_state=server_state, app_state=app_state, _loop=_loop
            )
            super().__init__(protocol, rules, _loop or asyncio.get_running_loop())

    return BoundHeadDeadline
