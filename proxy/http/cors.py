"""CORS: preflight answers and the headers added to every response of an allowed origin.

The origin is echoed (never `*`, which browsers refuse with credentials); an unlisted origin is served
without CORS headers; one merged `Vary`.
"""

from __future__ import annotations

from blacksheep import Content, Request, Response

from proxy.http.responses import DOCUMENT_UPDATED_AT

PREFLIGHT_METHODS = b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"


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

    def add_headers(self, response: Response, origin: bytes) -> None:
        if not self.allowed(origin) or response.has_header(b"access-control-allow-origin"):
            return
        # Echo the origin (never `*` with credentials), let browser SDKs read the document timestamp.
        response.add_header(b"access-control-allow-origin", origin)
        response.add_header(b"access-control-allow-credentials", b"true")
        # ETag: browser OFREP providers poll the bulk endpoint with If-None-Match.
        response.add_header(b"access-control-expose-headers", DOCUMENT_UPDATED_AT + b", etag")
        vary = response.get_first_header(b"vary")
        response.set_header(b"vary", vary + b", Origin" if vary else b"Origin")
