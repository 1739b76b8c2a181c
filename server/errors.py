"""The service's errors, each carrying the HTTP status it maps to (mapped in one place, server/app.py)."""

from __future__ import annotations


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


class Unavailable(ServiceError):
    """Full, or the engine is not ready yet: come back after Retry-After seconds."""

    status = 503
