"""Answers from pre-encoded bodies: gzip negotiation, `Vary`, the document timestamp, conditional GET.

Plain functions on bytes, no state and no framework: both request paths call them (proxy/http/hot.py), so
each one is a handful of header operations at most.
"""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime

from proxy.area.bodies import GZIP_MIN_BYTES, Body
from proxy.http.exchange import Headers, Reply
from proxy.worker.served import Served

DOCUMENT_UPDATED_AT = b"x-flagsmith-document-updated-at"


# Verdicts by header value: clients send a handful of distinct values, so parsing happens once per value
# (a dict lookup per request); cleared when full, so hostile values cannot grow it.
_GZIP_VERDICTS: dict[bytes, bool] = {}
_GZIP_VERDICTS_MAX = 512
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")  # RFC 9110 §12.4.2


def accepts_gzip(accept: bytes | None) -> bool:
    """Does an Accept-Encoding value take gzip?"""
    if accept is None:
        return False
    verdict = _GZIP_VERDICTS.get(accept)
    if verdict is None:
        if len(_GZIP_VERDICTS) >= _GZIP_VERDICTS_MAX:
            _GZIP_VERDICTS.clear()
        verdict = _GZIP_VERDICTS[accept] = gzip_acceptable(accept)
    return verdict


def gzip_acceptable(accept: bytes) -> bool:
    """Does this Accept-Encoding value (RFC 9110 §12.5.3) let us send gzip rather than the plain body?

    Codings are case-insensitive, each with an optional `q` weight (default 1; 0 = not acceptable); `gzip`
    (or its alias `x-gzip`) takes its own weight, else that of `*`, else it is not acceptable. gzip is sent
    unless `identity` (listed, or through `*`) is preferred with a higher weight. An element whose weight is
    malformed is ignored; of two elements for one coding, the first counts.
    """
    weights: dict[str, float] = {}
    for element in accept.decode("latin-1").split(","):
        coding, _, parameters = element.partition(";")
        coding = coding.strip().lower()
        weight = _weight(parameters)
        if coding and weight is not None:
            weights.setdefault(coding, weight)
    gzip = weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0)))
    identity = weights.get("identity", weights.get("*"))
    return gzip > 0 and (identity is None or gzip >= identity)


def _weight(parameters: str) -> float | None:
    weight = 1.0
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            value = value.strip()
            if not _QVALUE.fullmatch(value):
                return None
            weight = float(value)
    return weight


def negotiated(accept: bytes | None, body: Body, headers: Headers) -> bytes:
    """The bytes to send for `body`: gzip when asked and worth it; adds Vary/Content-Encoding to `headers`."""
    data = body.plain
    if len(data) >= GZIP_MIN_BYTES:
        headers.append((b"vary", b"Accept-Encoding"))
        if body.gzip is not None and accepts_gzip(accept):
            data = body.gzip
            headers.append((b"content-encoding", b"gzip"))
    return data


def send(accept: bytes | None, body: Body, state: Served) -> Reply:
    """200 with `body`, gzip when asked and worth it, and the document's timestamp header."""
    headers: Headers = []
    data = negotiated(accept, body, headers)
    if state.updated_at_header is not None:
        headers.append((DOCUMENT_UPDATED_AT, state.updated_at_header))
    return Reply(200, headers, data)


def gzip_chosen(accept: bytes | None, body: Body) -> bool:
    """Is `body` sent gzip-encoded to a request with this Accept-Encoding? (What `negotiated` decides.)"""
    return body.gzip is not None and accepts_gzip(accept)


_ENTITY_TAG = re.compile(rb'(?:W/)?"([^"]*)"')


def none_match(header: bytes, etag: bytes) -> bool:
    """Does an `If-None-Match` value match `etag`? Weak comparison, as RFC 9110 says for this header (`W/`
    ignored); `*` matches, since the document exists."""
    if header.strip() == b"*":
        return True
    opaque = etag[1:-1]
    return any(tag == opaque for tag in _ENTITY_TAG.findall(header))


def not_modified(since: bytes, last_modified: bytes) -> bool:
    """Does an `If-Modified-Since` value cover a document last modified at `last_modified`? (An unparsable
    date does not.) A client usually echoes the Last-Modified it got: equal bytes need no parsing."""
    if since == last_modified:
        return True
    try:
        when = parsedate_to_datetime(since.decode("latin-1"))
    except (TypeError, ValueError):
        return False
    return when.tzinfo is not None and parsedate_to_datetime(last_modified.decode("latin-1")) <= when
