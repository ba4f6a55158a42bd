"""The fast path: the hot routes served straight from ASGI, everything else handed to BlackSheep unchanged.

Granian calls this callable; it looks the raw path and method up in the route table's hot part
(proxy/http/routes.py `HOT_BY_PATH`, `HOT_BY_PREFIX`) and, for a hot route, builds a `Call` from the scope,
runs the same framework-free handler and wrapper BlackSheep's route for it would (proxy/http/hot.py
`HotRoutes.serve`) and sends the `Reply` as BlackSheep would send it. It decides from the scope alone, before
touching `receive`, so what it hands over (other routes and methods, preflight, spellings it does not know:
BlackSheep also matches paths case-insensitively, a mounted root path, lifespan) reaches BlackSheep with its
body unread. tests/test_fast_path.py proves both give the same answers.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from proxy.http.exchange import Call, Receive
from proxy.http.hot import HotRoutes
from proxy.http.routes import HOT_BY_PATH, HOT_BY_PREFIX, parameter

Scope = dict[str, Any]
Send = Any  # the ASGI send callable
Asgi = Any  # an ASGI application


class FastPath:
    __slots__ = ("app", "hot")

    def __init__(self, hot: HotRoutes, app: Asgi) -> None:
        self.hot = hot
        self.app = app  # the BlackSheep application, for everything the fast path does not serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: bytes | None = scope.get("raw_path")
        if path is not None and scope["type"] == "http" and not scope.get("root_path"):
            methods = HOT_BY_PATH.get(path)
            value = ""
            if methods is None:
                methods, value = _parameterised(path)
            if methods is not None:
                method = scope["method"]
                route = methods.get(method)
                if route is not None:
                    template, name = route
                    call = Call(
                        method, path, scope["query_string"], scope["headers"], receive, value, scope.get("client")
                    )
                    reply = await self.hot.serve(call, template, self.hot.handlers[name])
                    await send({"type": "http.response.start", "status": reply.status, "headers": reply.asgi_headers()})
                    await send({"type": "http.response.body", "body": reply.body or b""})
                    return
        await self.app(scope, receive, send)


def _parameterised(path: bytes) -> tuple[dict[str, tuple[str, str]] | None, str]:
    """The hot routes with a `{key}` segment: their methods and the decoded value, as BlackSheep decodes it."""
    for prefix, suffix, methods in HOT_BY_PREFIX:
        if path.startswith(prefix):
            param = parameter(path, prefix, suffix)
            if param is not None:
                try:
                    return methods, unquote(param.decode("utf8"))
                except UnicodeDecodeError:
                    return None, ""  # BlackSheep's to answer, whatever it does with it
    return None, ""
