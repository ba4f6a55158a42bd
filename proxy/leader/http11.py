"""A small HTTP/1.1 client for the leader's document fetches: one keep-alive pool to the upstream origin.

The leader answers a conditional fetch for every environment every poll interval: with 10,000 environments
polled every 60 s, 167 a second, nearly all 304s. httpx spends about 1 ms of the leader's CPU on each (URL
and header models, the connection pool's anyio locks, h11), this client about a tenth of that: a request is
a few header lines written to a kept-alive asyncio stream, a response a status line and headers split at
their CRLFs, and a body read by Content-Length or chunks, within the caller's byte budget. Nothing else is
supported: no proxies (`HttpSource` keeps httpx when an environment proxy applies), no redirects or cookies
(the caller follows same-origin redirects itself), no HTTP/2.

Every read and the connect are bounded by `timeout` (as httpx's per-operation timeouts); the caller bounds
the whole fetch. A connection is reused only after a response it read in full that did not ask to close;
a reused connection the server closed meanwhile is retried once on a fresh one, before anything was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

CHUNK = 65536
MAX_HEAD = 64 * 1024  # status line and headers


class UpstreamError(Exception):
    """The exchange failed (connection, protocol); the message says how."""


class UpstreamTimeout(UpstreamError):
    """A connect or a read took longer than the timeout."""


class TooLarge(Exception):
    """The body (declared or read so far) is larger than the caller's budget."""


@dataclass(slots=True)
class Answer:
    status_code: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    content: bytes  # as sent (still gzip when Content-Encoding says so)
    url: str

    def next_link(self) -> str | None:
        """The `rel="next"` target of the Link header, if any (as sent: relative or absolute)."""
        for part in self.headers.get("link", "").split(","):
            target, _, params = part.partition(">")
            if "<" in target and any(
                p.strip().replace(" ", "").lower() in ('rel="next"', "rel=next") for p in params.split(";")
            ):
                return target.strip().lstrip("<")
        return None


class _Connection:
    __slots__ = ("reader", "used", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.used = reader, writer, False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Pool:
    """Keep-alive connections to one origin (`http://host:port` or `https://...`)."""

    def __init__(
        self, origin: str, timeout: float, headers: Mapping[str, str], ssl_context: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(origin)
        self.host = parts.hostname or ""
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if self.tls else None
        self.timeout = timeout
        host = self.host if ":" not in self.host else f"[{self.host}]"
        default = self.port == (443 if self.tls else 80)
        self._head = f"Host: {host if default else f'{host}:{self.port}'}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        self._idle: deque[_Connection] = deque()

    async def get(self, url: str, headers: Mapping[str, str], budget: int) -> Answer:
        """GET `url` (on this pool's origin). TooLarge past `budget` bytes of body; UpstreamError otherwise."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {target} HTTP/1.1\r\n{self._head}"
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            + "\r\n"
        ).encode("latin-1")
        while True:
            connection = self._idle.pop() if self._idle else await self._connect()
            reused = connection.used
            try:
                answer, keep = await self._exchange(connection, request, url, budget)
            except _ClosedBeforeAnswer:
                connection.close()
                if reused:
                    continue  # the server closed it while idle: once more, on a fresh connection
                raise UpstreamError("the server closed the connection without answering") from None
            except BaseException:
                connection.close()
                raise
            if keep:
                connection.used = True
                self._idle.append(connection)
            else:
                connection.close()
            return answer

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.tls else None, limit=MAX_HEAD
                )
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {self.host}:{self.port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return _Connection(reader, writer)

    async def _exchange(self, connection: _Connection, request: bytes, url: str, budget: int) -> tuple[Answer, bool]:
        reader = connection.reader
        try:
            connection.writer.write(request)
            head = await self._within(reader.readuntil(b"\r\n\r\n"))
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _ClosedBeforeAnswer from None
            raise UpstreamError("the response ended inside its headers") from None
        except asyncio.LimitOverrunError:
            raise UpstreamError(f"response headers longer than {MAX_HEAD} bytes") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from None
        status, headers, keep = _parse_head(head)
        try:
            if status in (204, 304) or 100 <= status < 200:
                content = b""
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                content = await self._chunked(reader, budget)
            elif (length := headers.get("content-length")) is not None:
                if not length.isdigit():
                    raise UpstreamError(f"invalid Content-Length {length[:20]!r}")
                if int(length) > budget:
                    raise TooLarge
                content = await self._exactly(reader, int(length))
            else:  # the body runs to the end of the connection
                content, keep = await self._to_end(reader, budget), False
        except asyncio.IncompleteReadError:
            raise UpstreamError("the response ended before its body did") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from None
        return Answer(status, headers, content, url), keep

    async def _exactly(self, reader: asyncio.StreamReader, length: int) -> bytes:
        chunks: list[bytes] = []
        while length:
            chunk = await self._within(reader.read(min(length, CHUNK)))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", length)
            chunks.append(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    async def _chunked(self, reader: asyncio.StreamReader, budget: int) -> bytes:
        chunks: list[bytes] = []
        while True:
            size_line = await self._within(reader.readuntil(b"\r\n"))
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise UpstreamError("invalid chunk size") from None
            if size == 0:
                while (await self._within(reader.readuntil(b"\r\n"))) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            budget -= size
            if budget < 0:
                raise TooLarge
            chunks.append(await self._exactly(reader, size))
            if await self._exactly(reader, 2) != b"\r\n":
                raise UpstreamError("a chunk does not end with CRLF")

    async def _to_end(self, reader: asyncio.StreamReader, budget: int) -> bytes:
        chunks: list[bytes] = []
        while chunk := await self._within(reader.read(CHUNK)):
            budget -= len(chunk)
            if budget < 0:
                raise TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _within(self, read: Awaitable[bytes]) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                return await read
        except TimeoutError:
            raise UpstreamTimeout(f"no data from {self.host}:{self.port} for {self.timeout:g} s") from None

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


class _ClosedBeforeAnswer(Exception):
    pass


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    """(status, headers, may the connection be reused?) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise UpstreamError(f"not an HTTP/1.x response: {lines[0][:40]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise UpstreamError("a response header without a colon")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
    return int(code), headers, keep
