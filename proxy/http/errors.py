"""One error hierarchy, one place that renders it (`error_reply`, for both the fast path and BlackSheep).

Application errors are `{"status": ..., "message": ...}` (the Rust proxy's shape); request validation keeps
the captured FastAPI shape `{"detail": [{"type", "loc", "msg", "input"}]}` (`RequestInvalid`). Every body
is JSON that says what is wrong, and rendering never fails: an input that cannot be echoed (nested past
orjson's depth limit, say) is replaced by a note rather than turning a 422 into a 500.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from proxy.http.exchange import Reply

log = logging.getLogger("proxy.app")

# Inputs longer than this are not echoed whole in a 422 (a client must not make us send megabytes back).
MAX_ECHO_BYTES = 64 * 1024
UNECHOABLE = "<input not echoed: too large or too deeply nested>"


class ProxyError(Exception):
    status = 500
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> bytes:
        return orjson.dumps({"status": self.code, "message": self.message})


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class Unauthorized(ProxyError):
    status = 401
    code = "unauthorized"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class RequestTimeout(ProxyError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "payload_too_large"


class ClientDisconnected(ProxyError):
    """The client went away mid-body: its mistake, not ours. Counted (as nginx's 499), never a traceback."""

    status = 499
    code = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("client disconnected")


class ServiceUnavailable(ProxyError):
    status = 503
    code = "service_unavailable"


class RequestInvalid(ProxyError):
    """A request that fails validation: 422 with `{"detail": [errors]}`, as the Python proxy (FastAPI)."""

    status = 422
    code = "invalid"

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("request invalid")
        self.errors = errors

    def body(self) -> bytes:
        try:
            return orjson.dumps({"detail": [_echoable(error) for error in self.errors]})
        except TypeError:  # pragma: no cover - _echoable already guards
            return orjson.dumps({"detail": [{**e, "input": UNECHOABLE} for e in self.errors]}, default=str)


def _echoable(error: dict[str, Any]) -> dict[str, Any]:
    if "input" not in error:
        return error
    try:
        encoded = orjson.dumps(error["input"])
    except (
        TypeError
    ):  # orjson.JSONEncodeError is one: deeper than orjson encodes (254 levels) or an integer past 64 bits
        return {**error, "input": UNECHOABLE}
    if len(encoded) > MAX_ECHO_BYTES:
        return {**error, "input": UNECHOABLE}
    return error


# The compatibility shapes of the routing errors, as the captures have them.
NOT_FOUND_BODY = orjson.dumps({"detail": "Not Found"})
METHOD_NOT_ALLOWED_BODY = orjson.dumps({"detail": "Method Not Allowed"})
INTERNAL_ERROR_BODY = orjson.dumps({"status": "error", "message": "internal error"})


class TraitsUnevaluable(RequestInvalid):
    def __init__(self, exc: Exception) -> None:
        super().__init__(
            [
                {
                    "type": "value_error",
                    "loc": ["body", "traits"],
                    "msg": f"a trait value cannot be evaluated against this environment's segments: {exc}",
                    "input": None,
                }
            ]
        )


def error_reply(error: Exception, method: str, path: bytes) -> Reply:
    """The one place an exception becomes an answer: a ProxyError's own status and body, else a logged 500."""
    if isinstance(error, ProxyError):
        if isinstance(error, ClientDisconnected):
            log.debug("client disconnected before sending the whole body: %s", path.decode(errors="replace"))
        # A client that could not send its body in time gets the connection closed too.
        return Reply(error.status, [(b"connection", b"close")] if error.status == 408 else [], error.body())
    log.exception("unexpected error serving %s %s", method, path.decode(errors="replace"), exc_info=error)
    return Reply(500, [], INTERNAL_ERROR_BODY)
