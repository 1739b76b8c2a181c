"""The service's errors, each carrying the HTTP status it maps to (mapped in one place, server/app.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

#: longest piece of a client's input (a field name, a message) an error body repeats
ECHO_LIMIT = 80


class ErrorBody(BaseModel):
    """Every error the API answers with: a message for a person (never the raw input)."""

    detail: str | list[dict[str, Any]] = Field(
        ..., description="What was wrong; for 422 a list of {loc, msg, type}, one per invalid field."
    )


def safe_text(value: object, limit: int = ECHO_LIMIT) -> str:
    """`value` as text that always encodes (lone surrogates escaped) and is never longer than `limit`."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_invalid(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """pydantic's errors as {loc, msg, type}, without the input: it may be huge, or hold text that cannot be
    encoded (a lone surrogate), and the client has it already."""
    return [
        {
            "loc": [safe_text(part) for part in error.get("loc", ())],
            "msg": safe_text(error.get("msg", "invalid"), 300),
            "type": safe_text(error.get("type", "value_error")),
        }
        for error in list(errors)[:20]
    ]


class ServiceError(Exception):
    """An error a client caused or must handle; `status` is its HTTP status code."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadOffer(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


class SessionNotFound(ServiceError):
    status = 404


class TooLarge(ServiceError):
    status = 413


class TooManyRequests(ServiceError):
    status = 429


class Unavailable(ServiceError):
    """Full, or the engine is not ready yet: come back after Retry-After seconds."""

    status = 503
