"""The floors: Granian with the proxy's own server options, serving fixed bytes and doing no other work.

Three applications answer every GET with the same pre-built bytes, and every POST the same after reading
the whole body (as the proxy must):

* `raw`: a bare ASGI callable, the floor any ASGI application can reach on this server (the proxy's fast
  path is measured against it);
* `blacksheep`: the same through BlackSheep, the framework the proxy's other routes run on;
* `rsgi`: Granian's own RSGI interface, for context only (the proxy speaks ASGI).

What the proxy reaches against the raw floor, in the same run on the same core, is the share of the server's
throughput its own code leaves.

    .venv/bin/python -m benchmarks.ceiling --port 8100 [--app raw|blacksheep|rsgi] [--body-bytes 2200]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from blacksheep import Application, Content, Request, Response
from blacksheep.server.routing import Router

BODY_ENV = "CEILING_BODY_BYTES"
JSON = b"application/json"
APPS = {"raw": "create_raw_app", "blacksheep": "create_app", "rsgi": "create_rsgi_app"}


def fixed_body() -> bytes:
    size = int(os.environ.get(BODY_ENV, "2200"))  # about the conformance environment's identity response
    return b'{"flags":"' + b"x" * max(0, size - 12) + b'"}'


def raw_floor() -> Any:
    """The floor any ASGI application can reach: a bare callable answering the fixed bytes."""
    body = fixed_body()
    headers = [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]
    start = {"type": "http.response.start", "status": 200, "headers": headers}
    answer = {"type": "http.response.body", "body": body}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan: nothing to start
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] == "POST":  # read the whole body first, as the proxy must
            while (await receive()).get("more_body"):
                pass
        await send(start)
        await send(answer)

    return app


def create_raw_app() -> Any:
    return raw_floor()


def create_app() -> Application:
    """The same fixed bytes through BlackSheep."""
    body = fixed_body()

    # Real annotations (not strings): BlackSheep would otherwise wrap the handlers in an extra layer.
    async def get(request: Request) -> Response:
        return Response(200, None, Content(JSON, body))

    async def post(request: Request) -> Response:
        await request.read()
        return Response(200, None, Content(JSON, body))

    get.__annotations__ = post.__annotations__ = {"request": Request, "return": Response}
    router = Router()
    for path in ("/api/v1/flags/", "/api/v1/identities/", "*"):
        router.add("GET", path, get)
        router.add("POST", path, post)
    return Application(router=router, show_error_details=False)


class RsgiFloor:
    """The fixed bytes through Granian's RSGI interface (context: what the server itself costs)."""

    def __init__(self) -> None:
        self.body = fixed_body()
        self.headers = [("content-type", JSON.decode())]

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.method == "POST":
            await protocol()  # the whole body
        protocol.response_bytes(200, self.headers, self.body)


def create_rsgi_app() -> RsgiFloor:
    return RsgiFloor()


def main() -> None:
    from granian import Granian
    from granian.constants import Interfaces

    from proxy.config.granian import load_granian_options
    from proxy.config.settings import Settings
    from proxy.supervisor.server import granian_kwargs

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--app", choices=list(APPS), default="blacksheep")
    parser.add_argument("--body-bytes", type=int, default=2200)
    args = parser.parse_args()
    os.environ[BODY_ENV] = str(args.body_bytes)
    # The proxy's defaults (granian.toml) with one worker, so only the application differs.
    options = load_granian_options(None, {}, {"host": "127.0.0.1", "port": args.port, "workers": 1}, {})
    settings = Settings(environment_key_pairs=[{"server_side_key": "ser.unused", "client_side_key": "unused"}])
    kwargs = granian_kwargs(options, settings)
    if args.app == "rsgi":
        kwargs["interface"] = Interfaces.RSGI
    Granian(f"benchmarks.ceiling:{APPS[args.app]}", **kwargs).serve()


if __name__ == "__main__":
    main()
