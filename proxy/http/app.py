"""The application: BlackSheep routes from the one route table, behind the fast path.

`build_asgi` returns what Granian runs: the fast path (proxy/http/fast_path.py) in front of the BlackSheep
application, or the BlackSheep application alone with `server.fast_path: false`. The hot routes' handlers
are framework-free (proxy/http/hot.py); BlackSheep's routes for them adapt a `Request` to a `Call` and a
`Reply` to a `Response`. The other handlers here take exactly `(request: Request) -> Response` so BlackSheep
calls them unwrapped (no binders); each is wrapped once so the edge controls (`HotRoutes.admit`), errors
(`error_reply`), CORS and metrics (`HotRoutes.finish`) come from the same places the hot routes use.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from blacksheep import Application, Content, Request, Response
from blacksheep.contents import ASGIContent
from blacksheep.server.routing import Router

from proxy.config.settings import Settings
from proxy.http.analytics import parse_analytics_body
from proxy.http.edge_controls import Group
from proxy.http.errors import METHOD_NOT_ALLOWED_BODY, NOT_FOUND_BODY, NotFound, Unauthorized, error_reply
from proxy.http.exchange import JSON, Call, Receive, Reply, json_reply
from proxy.http.fast_path import FastPath
from proxy.http.health import check_health
from proxy.http.hot import HotHandler, HotRoutes
from proxy.http.raw_request import raw_path, raw_query
from proxy.http.routes import HOT, ROUTES, methods_of, route_of
from proxy.http.status import authorized, status_body
from proxy.http.stream import StreamHub
from proxy.http.webhook import WebhookReceiver
from proxy.metrics import prometheus as metrics
from proxy.worker.store import Store

__all__ = ["ROUTES", "build_app", "build_asgi", "build_worker", "route_of"]

Handler = Callable[[Request], Awaitable[Response]]


def response_of(reply: Reply) -> Response:
    return Response(reply.status, reply.headers, None if reply.body is None else Content(JSON, reply.body))


def _receive_of(request: Request) -> Receive:
    content = request.content
    if isinstance(content, ASGIContent):
        receive: Receive = content.receive
        return receive
    # A body already in memory (BlackSheep's TestClient), or none: one message.
    body = (content.body or b"") if content is not None else b""

    async def once() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return once


def call_of(request: Request) -> Call:
    headers = [(name.lower(), value) for name, value in request.headers.values or ()]
    values = request.route_values
    scope = request.scope
    return Call(
        request.method,
        raw_path(request),
        raw_query(request) or b"",
        headers,
        _receive_of(request),
        (values.get("key") if values else None) or "",
        scope.get("client") if scope else None,
    )


class ProxyApp:
    """The routes, bound to one worker's Store: the hot ones (HotRoutes) and the others."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.hot = HotRoutes(settings, store)
        self.controls = self.hot.controls
        self.pid = str(os.getpid()).encode()
        self.realtime = StreamHub(settings.realtime, store)
        self.webhooks = WebhookReceiver(settings.webhook, store.area, settings.shared_redis)

    async def read_body(self, request: Request) -> bytes:
        return await self.hot.body_reader.read(call_of(request))

    # -- analytics -------------------------------------------------------------------------------
    async def analytics(self, request: Request) -> Response:
        key = request.get_first_header(b"x-environment-key")
        self.store.resolve(key)
        raw = await self.read_body(request)
        _, state = self.store.resolve(key)
        # Only features the environment has are counted: invented names cannot grow buffers.
        counts, ignored = parse_analytics_body(raw, state.feature_names)
        self.store.counters.analytics.record(state.client_key, counts)
        if ignored:
            metrics.analytics_ignored[0] += ignored
        return Response(200, None, Content(JSON, b"{}"))

    # -- real-time stream and webhook refresh (proxy/http/stream.py, proxy/http/webhook.py) ------------------
    async def stream(self, request: Request) -> Response:
        if not self.settings.realtime.enabled:
            raise NotFound("real-time streams are off (realtime.enabled)")
        return await self.realtime.handle(request)

    async def webhook(self, request: Request) -> Response:
        return await self.webhooks.handle(request, self.read_body)

    # -- health and metrics ----------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        store = self.store
        waiting = bool(self.settings.proxy_key) and not store.discovered
        # Health stays open for probes; its details only for addresses access.operations allows.
        details = self.settings.health_check.show_details
        if details and self.controls.access:
            scope = request.scope
            details = self.controls.allowed(Group.OPERATIONS, scope.get("client"), scope["headers"])
        status, body = check_health(
            self.settings, store.keys.client_keys, store.entries, store.build_errors, time.time(), waiting, details
        )
        # What the answering worker has loaded; with show_details also which worker it is (its pid).
        headers = [(b"x-edge-proxy-generation", str(store.generation).encode())]
        if details:
            headers.append((b"x-edge-proxy-worker", self.pid))
        return Response(status, headers, Content(JSON, body))

    async def status(self, request: Request) -> Response:
        if not authorized(self.settings, request.get_first_header(b"authorization")):
            raise Unauthorized("GET /proxy/status needs 'Authorization: Bearer <status_token>'")
        return Response(200, None, Content(JSON, status_body(self.settings, self.store)))

    async def liveness(self, request: Request) -> Response:
        return Response(200, None, None)

    async def metrics(self, request: Request) -> Response:
        self.store.counters.flush_metrics(self.store.generation)
        return Response(200, None, Content(metrics.CONTENT_TYPE.encode(), metrics.render()))

    # -- 404 / 405 / preflight -------------------------------------------------------------------
    async def fallback(self, request: Request) -> Response:
        if request.method == "OPTIONS" and request.get_first_header(b"access-control-request-method"):
            return self.hot.cors.preflight(request)
        route = route_of(raw_path(request))
        if route is None:
            return response_of(json_reply(404, NOT_FOUND_BODY))
        return Response(405, [(b"allow", route[1])], Content(JSON, METHOD_NOT_ALLOWED_BODY))

    # -- the adapters: each BlackSheep route function is one of these -----------------------------
    def hot_route(self, template: str, handler: HotHandler) -> Handler:
        hot = self.hot

        async def route(request: Request) -> Response:
            return response_of(await hot.serve(call_of(request), template, handler))

        return route

    def route(self, template: str | None, handler: Handler) -> Handler:
        """`handler` with the edge controls, errors rendered, CORS and metrics; template None: the fallback,
        labelled by the route its path belongs to."""
        hot = self.hot

        async def route(request: Request) -> Response:
            started = time.perf_counter()
            label = template
            if label is None:
                found = route_of(raw_path(request))
                label = found[0] if found else None
            refusal = span = key = None
            if hot.controls.active:
                refusal, span, key = hot.admit(call_of(request), label)
            if refusal is not None:
                response = response_of(refusal)
            else:
                try:
                    response = await handler(request)
                except Exception as error:
                    response = response_of(error_reply(error, request.method, raw_path(request)))
            origin = request.get_first_header(b"origin")
            headers = response.headers.values  # the Response's own list: CORS headers are added to it
            assert headers is not None
            hot.finish(request.method, origin, label, response.status, headers, started, span, key)
            return response

        return route


def _plain(handler: Handler, name: str) -> Handler:
    # The exact `(request: Request) -> Response` signature so BlackSheep calls it unwrapped, with real classes,
    # not the strings `from __future__ import annotations` leaves: BlackSheep wraps a handler whose return
    # annotation is not `Response` in an extra `ensure_response` layer (measured +1 µs).
    handler.__name__ = handler.__qualname__ = name
    handler.__annotations__ = {"request": Request, "return": Response}
    return handler


def _build(settings: Settings, store: Store) -> tuple[Application, ProxyApp]:
    routes = ProxyApp(settings, store)
    router = Router()
    # BlackSheep matches a route with or without its trailing slash: one registration serves both.
    for path, (_, methods) in ROUTES.items():
        handlers: dict[str, Handler] = {}
        for method, name in methods_of(methods).items():  # HEAD wherever GET, as the fast path serves it
            handler = handlers.get(name)
            if handler is None:
                if name in HOT:
                    handler = routes.hot_route(path, routes.hot.handlers[name])
                else:
                    handler = routes.route(path, getattr(routes, name))
                handler = handlers[name] = _plain(handler, name)
            router.add(method, path, handler)
    router.fallback = _plain(routes.route(None, routes.fallback), "fallback")
    app = Application(router=router, show_error_details=False)
    return app, routes


def build_app(settings: Settings, store: Store) -> Application:
    """The BlackSheep application alone: every route, hot or not."""
    return _build(settings, store)[0]


def build_asgi(settings: Settings, store: Store) -> tuple[Any, Application]:
    """(What a worker serves, the BlackSheep application inside it): the fast path in front of BlackSheep,
    or BlackSheep alone with `server.fast_path: false`."""
    served, app, _ = build_worker(settings, store)
    return served, app


def build_worker(settings: Settings, store: Store) -> tuple[Any, Application, Callable[[], None]]:
    """`build_asgi`, and what ends the real-time streams (a worker's shutdown calls it)."""
    app, routes = _build(settings, store)
    return (FastPath(routes.hot, app) if settings.server.fast_path else app), app, routes.realtime.close_all
