"""The dashboard's live stream: Server-Sent Events from :class:`control.events.EventBus`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from starlette.responses import Response, StreamingResponse

from control.web import session as web
from control.web.core import Ctx, DashboardCore

#: a live stream sends a comment this often so proxies keep it open
SSE_KEEPALIVE = 15.0


class LivePages:
    """``/events``: presence, health, traffic and changes as they happen."""

    def __init__(self, core: DashboardCore) -> None:
        self.core = core

    async def live(self, ctx: Ctx) -> Response:
        # where to start: a reconnecting stream's Last-Event-ID, else the page's number
        text = ctx.request.headers.get("last-event-id") or ctx.request.query_params.get("after")
        after = int(text) if text and text.isascii() and text.isdigit() and len(text) < 19 else None
        subscription = self.core.bus.subscribe(after)
        if subscription is None:
            return self.core._refusal(503, "Busy", "Too many live pages are open.")

        async def stream() -> AsyncIterator[str]:
            with subscription:
                yield "retry: 3000\n\n"
                while True:
                    # a closed browser tab cancels this generator (StreamingResponse)
                    event = await subscription.next(SSE_KEEPALIVE)
                    if event is None:
                        yield ": keep-alive\n\n"
                        continue
                    if event.kind == "closing":
                        return
                    data = json.dumps(event.data, separators=(",", ":"), default=str)
                    ident = f"id: {event.seq}\n" if event.seq else ""
                    yield f"{ident}event: {event.kind}\ndata: {data}\n\n"
                    if event.kind == "overflow":
                        return

        headers = {**web.SECURITY_HEADERS, "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
