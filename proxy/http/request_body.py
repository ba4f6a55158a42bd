"""Reading a request body within a size cap and a deadline: a client can cost neither memory nor a task.

The body comes from the ASGI `receive` (proxy/http/exchange.py `Call`), whichever path serves the request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.http.errors import ClientDisconnected, PayloadTooLarge, RequestTimeout
from proxy.http.exchange import Call

SWEEP_SECONDS = 0.25  # how often overdue reads are looked for: the deadline's precision


class BodyReader:
    """The deadline is not an `asyncio.timeout` per request: on uvloop its timer costs about 16 % of an
    uncached identity POST (py-spy). A read registers its task in a dict instead (one store, one pop), and
    one timer per worker, running only while reads are pending, cancels the overdue ones every
    SWEEP_SECONDS."""

    def __init__(self, max_bytes: int, timeout: float) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeping = False

    async def read(self, call: Call) -> bytes:
        """The whole body; 413 above the cap (before reading when it is declared), 408 when it trickles,
        499 when the client goes away."""
        length = call.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large()
        # A body that trickles in (or never completes) must not hold a connection and a task forever.
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - ASGI servers always run the application in a task
            return await self._read_within_cap(call)
        self._deadlines[task] = time.monotonic() + self.timeout
        if not self._sweeping:
            self._sweeping = True
            asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)
        try:
            return await self._read_within_cap(call)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise  # cancelled by someone else (shutdown): not ours to swallow
            task.uncancel()
            raise RequestTimeout(
                f"request body not received within {self.timeout:g} s (request_body_timeout_seconds)"
            ) from None
        finally:
            del self._deadlines[task]
            if self._expired:
                self._expired.discard(task)

    def _sweep(self) -> None:
        now = time.monotonic()
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        if self._deadlines:
            asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)
        else:
            self._sweeping = False

    async def _read_within_cap(self, call: Call) -> bytes:
        message = await call.receive()
        if message["type"] != "http.request":
            raise ClientDisconnected()
        body: bytes = message.get("body", b"")
        if not message.get("more_body"):  # the usual case: the whole body in one message
            if len(body) > self.max_bytes:
                raise self._too_large()
            return body
        chunks = bytearray(body)  # in parts (chunked, or large): count as it arrives
        while True:
            if len(chunks) > self.max_bytes:
                raise self._too_large()
            message = await call.receive()
            if message["type"] != "http.request":
                raise ClientDisconnected()
            chunks += message.get("body", b"")
            if not message.get("more_body"):
                break
        if len(chunks) > self.max_bytes:
            raise self._too_large()
        return bytes(chunks)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")
