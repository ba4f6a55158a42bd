"""The leader's HTTP/1.1 client: keep-alive, bodies by length, chunks or to the end, budgets, timeouts; and what a
conditional fetch costs the leader (a real server on 127.0.0.1, in another process, answering 304)."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from proxy.config.settings import Settings
from proxy.leader.http11 import Pool, TooLarge, UpstreamError, UpstreamTimeout
from proxy.leader.sources import Fetched, HttpSource, NotModified, Validator

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(reply: Reply) -> tuple[asyncio.Server, str, list[int]]:
    """A server answering each request on a connection with `reply`; also counts connections."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await reply(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test ended
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", connections


def answer(data: bytes) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return reply


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def test_bodies_by_length_and_by_chunks_on_one_kept_alive_connection() -> None:
    async def scenario() -> None:
        replies = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n",
            b'HTTP/1.1 304 Not Modified\r\nLink: <http://h/p?page=2>; rel="next"\r\n\r\n',
        ]

        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(replies.pop(0))
            await writer.drain()

        server, origin, connections = await serve(reply)
        pool = Pool(origin, 5, {"User-Agent": "t"})
        first = await pool.get(origin + "/a", {}, 100)
        assert (first.status_code, first.content, first.headers["x-a"]) == (200, b"hello", "1, 2")
        second = await pool.get(origin + "/b?c=d", {}, 100)
        assert second.content == b"abcde"
        third = await pool.get(origin + "/c", {"If-Modified-Since": "x"}, 100)
        assert third.status_code == 304 and third.next_link() == "http://h/p?page=2"
        assert len(connections) == 1  # one connection, kept alive
        await pool.aclose()
        server.close()

    run(scenario)


def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async def scenario() -> None:
        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 304 Not Modified\r\n\r\n")
            await writer.drain()
            writer.close()  # closes after each answer, without saying so

        server, origin, connections = await serve(reply)
        pool = Pool(origin, 5, {})
        for _ in range(3):
            assert (await pool.get(origin + "/", {}, 10)).status_code == 304
        assert len(connections) == 3
        await pool.aclose()
        server.close()

    run(scenario)


def test_budgets_and_timeouts() -> None:
    async def scenario() -> None:
        async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
            await asyncio.sleep(5)

        declared, origin, _ = await serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n"))
        with pytest.raises(TooLarge):
            await Pool(origin, 5, {}).get(origin + "/", {}, 100)
        chunked, origin, _ = await serve(
            answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" + b"x" * 64 + b"\r\n")
        )
        with pytest.raises(TooLarge):
            await Pool(origin, 5, {}).get(origin + "/", {}, 50)
        to_end, origin, _ = await serve(answer(b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * 200))
        with pytest.raises(TooLarge):
            await Pool(origin, 5, {}).get(origin + "/", {}, 100)
        stalled, origin, _ = await serve(slow)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await Pool(origin, 0.3, {}).get(origin + "/", {}, 100)
        assert time.monotonic() - started < 2
        garbage, origin, _ = await serve(answer(b"SSH-2.0-OpenSSH\r\n\r\n"))
        with pytest.raises(UpstreamError, match=r"not an HTTP/1\.x response"):
            await Pool(origin, 5, {}).get(origin + "/", {}, 100)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await Pool("http://127.0.0.1:9", 5, {}).get("http://127.0.0.1:9/", {}, 100)
        for server in (declared, chunked, to_end, stalled, garbage):
            server.close()

    run(scenario)


def test_the_source_decodes_gzip_within_the_limit_and_follows_pages() -> None:
    async def scenario() -> None:
        page1 = b'{"api_key":"k","project":{"segments":[]},"feature_states":[],'
        page1 += b'"identity_overrides":[{"identifier":"a"}]}'
        page2 = b'{"identity_overrides":[{"identifier":"b"}]}'
        bodies = [gzip.compress(page1), page2]

        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            body = bodies.pop(0)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
            if body.startswith(b"\x1f\x8b"):
                head += b"Content-Encoding: gzip\r\nLink: </api/v1/environment-document/?page_id=1>; rel=next\r\n"
            writer.write(head + b"\r\n" + body)
            await writer.drain()

        server, origin, connections = await serve(reply)
        source = HttpSource(Settings(api_url=origin + "/api/v1", proxy_key="pk"))
        assert source.pool is not None
        result = await source.fetch("ser.k", None)
        assert isinstance(result, Fetched), result
        assert result.document["identity_overrides"] == [{"identifier": "a"}, {"identifier": "b"}]
        assert len(connections) == 1
        await source.aclose()
        server.close()

    run(scenario)


SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def do_GET(self):
        self.send_response(304)
        self.send_header("Last-Modified", "Wed, 01 May 2024 12:00:00 GMT")
        self.send_header("Content-Length", "0")
        self.end_headers()
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_a_conditional_fetch_answered_304_costs_the_leader_little_cpu() -> None:
    """Measured in the leader's thread (the server is another process): about 1 ms with httpx, under 0.2 ms
    with the pool on the development VM. Bounded here at 0.5 ms, the target."""
    upstream = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert upstream.stdout is not None
        port = int(upstream.stdout.readline())

        async def scenario() -> float:
            source = HttpSource(Settings(api_url=f"http://127.0.0.1:{port}/api/v1", proxy_key="pk"))
            held = Validator(datetime(2024, 5, 1, 12, tzinfo=UTC))
            for _ in range(20):
                assert isinstance(await source.fetch("ser.k", held), NotModified)
            best = float("inf")
            for _ in range(5):  # the best of five rounds: the machine is shared
                started = time.thread_time()
                for _ in range(200):
                    await source.fetch("ser.k", held)
                best = min(best, (time.thread_time() - started) / 200)
            await source.aclose()
            return best

        per_fetch = asyncio.run(scenario())
        print(f"\nleader CPU per conditional fetch answered 304: {per_fetch * 1000:.3f} ms")
        assert per_fetch < 0.0005
    finally:
        upstream.kill()
        upstream.wait()
        if upstream.stdout is not None:
            upstream.stdout.close()
