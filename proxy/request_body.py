"""Reading a request body within a size cap and a deadline: a client can cost neither memory nor a task."""

from __future__ import annotations

import asyncio

from blacksheep import Request

from proxy.errors import PayloadTooLarge, RequestTimeout


class BodyReader:
    def __init__(self, max_bytes: int, timeout: float) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def read(self, request: Request) -> bytes:
        """The whole body; 413 above the cap (before reading when it is declared), 408 when it trickles."""
        length = request.get_first_header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large()
        if request.content is None:
            return b""
        # A body that trickles in (or never completes) must not hold a connection and a task forever.
        try:
            async with asyncio.timeout(self.timeout):
                return await self._read_within_cap(request, length)
        except TimeoutError:
            raise RequestTimeout(
                f"request body not received within {self.timeout:g} s (request_body_timeout_seconds)"
            ) from None

    async def _read_within_cap(self, request: Request, length: bytes | None) -> bytes:
        if (length is not None and length.isdigit()) or not hasattr(request.content, "stream"):
            # A declared length within the cap (or a body already in memory): one read.
            body = await request.read() or b""
            if len(body) > self.max_bytes:
                raise self._too_large()
            return body
        chunks = bytearray()  # chunked: count as it arrives
        assert request.content is not None  # hasattr(None, "stream") is False: handled above
        async for chunk in request.content.stream():
            if chunk:
                chunks += chunk
                if len(chunks) > self.max_bytes:
                    raise self._too_large()
        return bytes(chunks)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")
