"""What an idle stream costs the stack alone: the worker's memory per held streaming response for a raw ASGI
app and a bare BlackSheep app on Granian (one worker), to compare with the proxy's figure from
`benchmarks.streams`.

    .venv/bin/python -m benchmarks.streams_floor [--streams 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from blacksheep import Application, Request, Response, StreamedContent

from benchmarks.streams import Holder, raise_fd_limit, rss_kib
from tests.support import free_port, wait_for

FOREVER = asyncio.Event  # each app waits on an Event that is never set: the stream stays idle


def raw_app() -> Callable[..., Awaitable[None]]:
    never = FOREVER()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
        await send(start)
        await send({"type": "http.response.body", "body": b"retry: 1000\n\n", "more_body": True})
        await never.wait()

    return app


def blacksheep_app() -> Application:
    app = Application()
    never = FOREVER()

    async def stream(request: Request) -> Response:
        async def provider() -> AsyncIterator[bytes]:
            yield b"retry: 1000\n\n"
            await never.wait()

        return Response(200, [], StreamedContent(b"text/event-stream", provider))

    app.router.add_get("/s", stream)
    return app


def measure(factory: str, count: int) -> float:
    port = free_port()
    command = [sys.executable, "-m", "granian", "--interface", "asgi", "--factory", "--workers", "1"]
    command += ["--port", str(port), "--backpressure", str(count + 1024), "--loop", "uvloop", factory]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def worker() -> int | None:
            found = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
            return int(found[0]) if found else None

        assert wait_for(lambda: worker() is not None, 20)
        time.sleep(1.5)  # the worker imports the app
        pid = worker()
        assert pid is not None
        before = rss_kib(pid)
        holder = Holder(port, count, "/s")  # the same client as benchmarks.streams uses
        holder.start()
        time.sleep(2)
        after = rss_kib(pid)
        holder.close()
        print(f"{factory}: {before / 1024:.1f} MiB → {after / 1024:.1f} MiB", flush=True)
        return (after - before) / count
    finally:
        server.terminate()
        server.wait(20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=5000)
    args = parser.parse_args()
    raise_fd_limit(args.streams * 2 + 1024)
    for label, factory in [
        ("raw ASGI", "benchmarks.streams_floor:raw_app"),
        ("BlackSheep", "benchmarks.streams_floor:blacksheep_app"),
    ]:
        print(f"| {label} on Granian | {measure(factory, args.streams):.1f} KiB per stream |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
