"""One error type, one JSON shape: `{"status": ..., "message": ...}`, rendered by one handler in app.py."""

from __future__ import annotations

import orjson


class ProxyError(Exception):
    status = 500
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> bytes:
        return orjson.dumps({"status": self.code, "message": self.message})


class Unauthorized(ProxyError):
    status = 401
    code = "unauthorized"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "payload_too_large"


class ServiceUnavailable(ProxyError):
    status = 503
    code = "service_unavailable"
