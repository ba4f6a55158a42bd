"""Raw ASGI calls, in process: what Granian hands an application, without Granian.

Used by the in-process tier (tests/inprocess.py), the fast path's equivalence test and the in-process
micro-benchmarks: a request is a scope, a `receive` that gives the body (in one message, in chunks, or
never) and a `send` that records the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

STALL = object()  # in `chunks`: the client stops sending here (the read waits until cancelled)
DISCONNECT = object()  # in `chunks`: the client goes away here


@dataclass(frozen=True)
class Sent:
    """What the application sent: status, headers as sent (names and order), the body's bytes joined."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key.lower() == name), None)


def scope_of(method: str, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Scope:
    path, _, query = target.partition(b"?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(path.decode("latin-1")),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": [(name.lower(), value) for name, value in headers],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


def receiver(chunks: Sequence[bytes | object]) -> Receive:
    """`receive` giving `chunks` as body messages (the last with more_body False), STALL waits for ever."""
    pending = list(chunks) or [b""]

    async def receive() -> Message:
        if not pending:
            await asyncio.Event().wait()  # after the body: Granian waits for the disconnect
        item = pending.pop(0)
        if item is STALL:
            await asyncio.Event().wait()
        if item is DISCONNECT:
            return {"type": "http.disconnect"}
        assert isinstance(item, bytes)
        return {"type": "http.request", "body": item, "more_body": bool(pending)}

    return receive


async def call(
    app: Asgi,
    method: str,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes | Sequence[bytes | object] = b"",
) -> Sent:
    """One request through `app`; `body` as bytes (one message) or a list of chunks (STALL, DISCONNECT)."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    chunks = [body] if isinstance(body, bytes) else list(body)
    await app(scope_of(method, target, headers), receiver(chunks), send)
    start = sent[0]
    assert start["type"] == "http.response.start", sent
    assert all(m["type"] == "http.response.body" for m in sent[1:]) and not sent[-1].get("more_body"), sent
    return Sent(start["status"], list(start.get("headers", [])), b"".join(m.get("body", b"") for m in sent[1:]))
