"""Building responses from pre-encoded bodies: JSON responses, gzip negotiation, conditional GET.

Plain functions on bytes, no state: the routes (`proxy/http/app.py`, `proxy/http/ofrep.py`) call them on the
request path, so each one is a handful of header operations at most.
"""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime

from blacksheep import Content, Request, Response

from proxy.area.bodies import GZIP_MIN_BYTES, Body
from proxy.worker.environment import EnvironmentState

JSON = b"application/json"
DOCUMENT_UPDATED_AT = b"x-flagsmith-document-updated-at"


def accepts_gzip(request: Request) -> bool:
    accept = request.get_first_header(b"accept-encoding")
    return accept is not None and b"gzip" in accept.lower() and b"gzip;q=0" not in accept.replace(b" ", b"")


def json_response(status: int, data: bytes) -> Response:
    return Response(status, None, Content(JSON, data))


def negotiated(request: Request, body: Body, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The bytes to send for `body`: gzip when asked and worth it; adds Vary/Content-Encoding to `headers`."""
    data = body.plain
    if len(data) >= GZIP_MIN_BYTES:
        headers.append((b"vary", b"Accept-Encoding"))
        if body.gzip is not None and accepts_gzip(request):
            data = body.gzip
            headers.append((b"content-encoding", b"gzip"))
    return data


def send(request: Request, body: Body, state: EnvironmentState) -> Response:
    """200 with `body`, gzip when asked and worth it, and the document's timestamp header."""
    headers: list[tuple[bytes, bytes]] = []
    data = negotiated(request, body, headers)
    if state.updated_at_header is not None:
        headers.append((DOCUMENT_UPDATED_AT, state.updated_at_header))
    return Response(200, headers, Content(JSON, data))


def gzip_chosen(request: Request, body: Body) -> bool:
    """Is `body` sent gzip-encoded to this request? (What `negotiated` decides.)"""
    return body.gzip is not None and accepts_gzip(request)


_ENTITY_TAG = re.compile(rb'(?:W/)?"([^"]*)"')


def none_match(header: bytes, etag: bytes) -> bool:
    """Does an `If-None-Match` value match `etag`? Weak comparison, as RFC 9110 says for this header (`W/`
    ignored); `*` matches, since the document exists."""
    if header.strip() == b"*":
        return True
    opaque = etag[1:-1]
    return any(tag == opaque for tag in _ENTITY_TAG.findall(header))


def not_modified(since: bytes, state: EnvironmentState) -> bool:
    """Does an `If-Modified-Since` value cover the state's document? (An unparsable date does not.)"""
    try:
        when = parsedate_to_datetime(since.decode("latin-1"))
    except (TypeError, ValueError):
        return False
    return state.updated_at is not None and when.tzinfo is not None and state.updated_at.replace(microsecond=0) <= when
