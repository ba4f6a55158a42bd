"""One request and its answer as the hot handlers see them: no framework, just bytes.

The hot routes (proxy/http/hot.py) take a `Call` and return a `Reply`. Two adapters feed them: the fast path
(proxy/http/fast_path.py) builds a Call from the ASGI scope and sends the Reply itself; the BlackSheep routes
(proxy/http/app.py) build one from a `Request` and turn the Reply into a `Response`. Both send the same
bytes: the Reply's headers in order, then `content-type` and `content-length` as BlackSheep appends them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Headers = list[tuple[bytes, bytes]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

JSON = b"application/json"


class Call:
    """`headers` are the request's as received, names lower-case (ASGI guarantees it); `receive` is the
    ASGI callable the body is read from, `route_value` the `{key}` of a parameterised route and `client` the
    scope's (address, port) of the peer (the edge controls read it)."""

    __slots__ = ("client", "headers", "method", "path", "query", "receive", "route_value")

    def __init__(
        self,
        method: str,
        path: bytes,
        query: bytes,
        headers: Headers,
        receive: Receive,
        route_value: str = "",
        client: Any = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.receive = receive
        self.route_value = route_value
        self.client = client

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), as BlackSheep's `get_first_header`."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Reply:
    """Status, headers and body; a body of None is no content at all (`content-length: 0`, no type),
    bytes are a JSON body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Headers, body: bytes | None) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def asgi_headers(self) -> Headers:
        """The headers as sent: the Reply's, then what BlackSheep appends for its content."""
        body = self.body
        if body is None:
            return [*self.headers, (b"content-length", b"0")]
        return [*self.headers, (b"content-type", JSON), (b"content-length", str(len(body)).encode())]


def json_reply(status: int, data: bytes) -> Reply:
    return Reply(status, [], data)
