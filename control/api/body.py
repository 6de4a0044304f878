"""A REST request's JSON body, read once the same way by every route: at most
``MAX_BODY`` bytes (413), JSON with bounded numbers (``common.jsonsafe``: a number no
field can hold is a 422 naming the field, anything malformed a 400), and an object
(422)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from common import jsonsafe
from control.api.errors import ApiError

MAX_BODY = 256 * 1024


async def json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"request body exceeds {MAX_BODY} bytes")
    try:
        data = jsonsafe.loads(raw or b"null")
    except jsonsafe.JsonNumberError as exc:  # well-formed, but no field holds that number
        raise ApiError(
            422,
            "validation_failed",
            f"request body: {exc}",
            [{"field": exc.field, "message": exc.reason}],
        ) from None
    except jsonsafe.JsonError as exc:
        raise ApiError(400, "malformed_json", f"request body is {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "validation_failed", "request body must be a JSON object")
    return data
