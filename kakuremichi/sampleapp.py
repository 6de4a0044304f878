"""A small web application to put behind a tunnel: the demo's app and the tests' origin.

    GET  /              a greeting (text)
    GET  /headers       the request as the app saw it (JSON: host, forwarding headers)
    GET  /bytes/{n}     n bytes of a fixed pattern, streamed (``pattern_sha256(n)``)
    POST /echo          the body sent back unchanged (at most 64 MiB)
    POST /digest        {"bytes": n, "sha256": …} of the body, read as a stream
    WS   /ws            echoes every message

Run alone with ``python -m kakuremichi.sampleapp --port 8000``.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

_BLOCK = hashlib.sha256(b"kakuremichi").digest() * 2048  # 64 KiB
MAX_BYTES = 10 * 1024**3
MAX_ECHO = 64 * 1024**2


def pattern(n: int) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        left = n
        while left > 0:
            piece = _BLOCK[: min(left, len(_BLOCK))]
            left -= len(piece)
            yield piece

    return chunks()


def pattern_sha256(n: int) -> str:
    """The SHA-256 of ``GET /bytes/{n}``'s body."""
    digest = hashlib.sha256()
    full, rest = divmod(n, len(_BLOCK))
    for _ in range(full):
        digest.update(_BLOCK)
    digest.update(_BLOCK[:rest])
    return digest.hexdigest()


async def home(request: Request) -> Response:
    return PlainTextResponse(
        f"Hello from the kakuremichi sample app! You reached {request.headers.get('host')} "
        "through the tunnel.\n"
    )


async def headers(request: Request) -> Response:
    wanted = (
        "host",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        # who the gateway's access policy says the client is (issue 15)
        "x-auth-user",
        "x-auth-email",
        "x-auth-groups",
        "cookie",
    )
    return JSONResponse(
        {
            **{name: request.headers.get(name) for name in wanted},
            "path": request.url.path,
            "query": request.url.query,
        }
    )


async def data(request: Request) -> Response:
    try:
        n = int(request.path_params["n"])
    except ValueError:
        return PlainTextResponse("n must be an integer\n", status_code=400)
    if not 0 <= n <= MAX_BYTES:
        return PlainTextResponse(f"n must be 0..{MAX_BYTES}\n", status_code=400)
    return StreamingResponse(
        pattern(n),
        media_type="application/octet-stream",
        headers={"content-length": str(n)},
    )


async def echo(request: Request) -> Response:
    # Read first: a Starlette streaming response also listens for the disconnect
    # message, so it cannot consume the request stream at the same time.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ECHO:
            return PlainTextResponse(f"echo takes at most {MAX_ECHO} bytes\n", status_code=413)
    return Response(bytes(body), media_type="application/octet-stream")


async def digest(request: Request) -> Response:
    sha, total = hashlib.sha256(), 0
    async for chunk in request.stream():
        sha.update(chunk)
        total += len(chunk)
    return JSONResponse({"bytes": total, "sha256": sha.hexdigest()})


async def websocket_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            elif message.get("bytes") is not None:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


def create_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/", home),
            Route("/headers", headers),
            Route("/bytes/{n}", data),
            Route("/echo", echo, methods=["POST", "PUT"]),
            Route("/digest", digest, methods=["POST", "PUT"]),
            WebSocketRoute("/ws", websocket_echo),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description="the kakuremichi sample app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
