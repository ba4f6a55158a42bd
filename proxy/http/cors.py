"""CORS: preflight answers and the headers added to every response of an allowed origin.

The origin is echoed (never `*`, which browsers refuse with credentials); an unlisted origin is served
without CORS headers; one merged `Vary`.
"""

from __future__ import annotations

from blacksheep import Content, Request, Response

from proxy.http.exchange import Headers
from proxy.http.responses import DOCUMENT_UPDATED_AT

PREFLIGHT_METHODS = b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
EXPOSED = DOCUMENT_UPDATED_AT + b", etag"


class Cors:
    def __init__(self, allow_origins: list[str]) -> None:
        self.allow_any_origin = "*" in allow_origins
        self.allowed_origins = {origin.encode() for origin in allow_origins}

    def allowed(self, origin: bytes) -> bool:
        return self.allow_any_origin or origin in self.allowed_origins

    def preflight(self, request: Request) -> Response:
        response = Response(200, None, Content(b"text/plain; charset=utf-8", b"OK"))
        origin = request.get_first_header(b"origin")
        if origin is not None and self.allowed(origin):
            response.add_header(b"vary", b"Origin")
            response.add_header(b"access-control-allow-methods", PREFLIGHT_METHODS)
            response.add_header(b"access-control-max-age", b"600")
            response.add_header(b"access-control-allow-credentials", b"true")
            response.add_header(b"access-control-allow-origin", origin)
            requested = request.get_first_header(b"access-control-request-headers")
            if requested:
                response.add_header(b"access-control-allow-headers", requested)
        return response

    def add_headers(self, headers: Headers, origin: bytes) -> None:
        """Add CORS headers for `origin` to an answer's header list (a Reply's, or a BlackSheep Response's
        `headers.values`): the one place both request paths get them from."""
        if not self.allowed(origin):
            return
        vary = None
        for name, value in headers:
            if name == b"access-control-allow-origin":  # a preflight answer has its own
                return
            if name == b"vary" and vary is None:
                vary = value
        if vary is not None:  # as BlackSheep's set_header: every Vary removed, the merged one goes last
            headers[:] = [header for header in headers if header[0] != b"vary"]
        # Echo the origin (never `*` with credentials), let browser SDKs read the document timestamp.
        # ETag: browser OFREP providers poll the bulk endpoint with If-None-Match.
        headers += (
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-expose-headers", EXPOSED),
            (b"vary", vary + b", Origin" if vary else b"Origin"),
        )
