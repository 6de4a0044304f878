"""One error shape for every API failure: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse


class ApiError(Exception):
    """An error the handler wants the client to see, with its HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, details: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message, "details": details or []}}
    return JSONResponse(body, status_code=status, headers=headers)


def from_validation(exc: ValidationError) -> ApiError:
    details = []
    for problem in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in problem.get("loc", ())) or "body"
        message = str(problem.get("msg", "invalid"))
        details.append({"field": where, "message": message.removeprefix("Value error, ")})
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:3])
    return ApiError(422, "validation_failed", f"invalid request: {summary}", details)
