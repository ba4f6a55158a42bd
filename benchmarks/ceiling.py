"""The fixed-bytes ceiling: Granian + BlackSheep with the proxy's own server options, doing no work.

Every GET answers the same pre-built bytes; every POST reads its body first (as the proxy must) and then
answers the same bytes. What the proxy reaches against this, in the same run on the same core, is the
share of the framework's throughput its own code leaves.

    .venv/bin/python -m benchmarks.ceiling --port 8100 [--body-bytes 2200]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from blacksheep import Application, Content, Request, Response
from blacksheep.server.routing import Router

BODY_ENV = "CEILING_BODY_BYTES"
JSON = b"application/json"


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


def create_app() -> Application:
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


def main() -> None:
    from granian import Granian

    from proxy.config.granian import load_granian_options
    from proxy.config.settings import Settings
    from proxy.supervisor.server import granian_kwargs

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-bytes", type=int, default=2200)
    args = parser.parse_args()
    os.environ[BODY_ENV] = str(args.body_bytes)
    # The proxy's defaults (granian.toml) with one worker, so only the application differs.
    options = load_granian_options(None, {}, {"host": "127.0.0.1", "port": args.port, "workers": 1}, {})
    settings = Settings(environment_key_pairs=[{"server_side_key": "ser.unused", "client_side_key": "unused"}])
    Granian("benchmarks.ceiling:create_app", **granian_kwargs(options, settings)).serve()


if __name__ == "__main__":
    main()
