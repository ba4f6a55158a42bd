"""The one place that reads BlackSheep's private `Request` attributes: the raw path and query bytes.

Why: `Request.path` decodes the path to `str` and `Request.query` parses the query string into a dict of
lists on every access; the hot routes need neither (route lookup works on bytes, and `query_param` reads
one parameter from the raw bytes). BlackSheep 2.x keeps the bytes from the ASGI scope in `_path` and
`_raw_query` (declared in `blacksheep/messages.pxd`, absent from its type stubs). If an upgrade renames
them, only this module changes; the in-process tests (tests/unit/test_routes.py) fail first.
"""

from __future__ import annotations

from blacksheep import Request


def raw_path(request: Request) -> bytes:
    """The request path as sent, percent-escapes kept, without the query."""
    path: bytes = request._path  # type: ignore[attr-defined]
    return path


def raw_query(request: Request) -> bytes | None:
    """The query string as sent (without `?`); empty or None when there is none."""
    query: bytes | None = request._raw_query  # type: ignore[attr-defined]
    return query
