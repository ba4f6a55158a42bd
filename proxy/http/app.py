"""BlackSheep routes: thin, bytes in / bytes out, and the table that registers them.

Handlers take exactly `(request: Request) -> Response` so BlackSheep calls them unwrapped (no binders).
Errors are exceptions mapped to responses in one place, `ProxyApp.middleware`, which also adds CORS
headers (`proxy/http/cors.py`) and counts requests for metrics. Environment-level bodies are pre-encoded in
`EnvironmentState`; identity responses come from `proxy/worker/identity_responses.py`; response building is in
`proxy/http/responses.py`, body reading in `proxy/http/request_body.py`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from blacksheep import Application, Content, Request, Response
from blacksheep.exceptions import MessageAborted
from blacksheep.server.routing import Router

from proxy.area.bodies import Body, KeyKind
from proxy.config.settings import Settings
from proxy.http.analytics import parse_analytics_body
from proxy.http.cors import Cors
from proxy.http.edge_controls import ROUTE_GROUPS, EdgeControls, Group
from proxy.http.errors import (
    INTERNAL_ERROR_BODY,
    METHOD_NOT_ALLOWED_BODY,
    NOT_FOUND_BODY,
    NotFound,
    ProxyError,
    Unauthorized,
)
from proxy.http.health import check_health
from proxy.http.identity_request import parse_identity_body, parse_identity_query, query_param
from proxy.http.ofrep import OfrepRoutes, request_key
from proxy.http.raw_request import raw_path, raw_query
from proxy.http.request_body import BodyReader
from proxy.http.responses import JSON, accepts_gzip, gzip_chosen, json_response, none_match, not_modified, send
from proxy.http.status import authorized, status_body
from proxy.http.stream import StreamHub, client_key_of
from proxy.http.webhook import WebhookReceiver
from proxy.metrics import prometheus as metrics
from proxy.worker.identity_responses import IdentityResponses
from proxy.worker.served import Served
from proxy.worker.store import Store

log = logging.getLogger("proxy.app")

Handler = Callable[[Request], Awaitable[Response]]

# path → (short name, {method: ProxyApp handler}); metrics label a route by its path, as Flagsmith's API does.
# Every GET route also answers HEAD, and every route answers with or without its trailing slash.
ROUTES: dict[str, tuple[str, dict[str, str]]] = {
    "/api/v1/flags/": ("flags", {"GET": "flags"}),
    "/api/v1/identities/": ("identities", {"GET": "identities_get", "POST": "identities_post"}),
    "/api/v1/environment-document/": ("environment_document", {"GET": "environment_document"}),
    "/api/v1/analytics/flags/": ("analytics", {"POST": "analytics"}),
    "/health": ("health", {"GET": "health"}),
    "/proxy/health": ("health", {"GET": "health"}),
    "/proxy/health/readiness": ("health", {"GET": "health"}),
    "/proxy/health/liveness": ("liveness", {"GET": "liveness"}),
    "/metrics": ("metrics", {"GET": "metrics"}),
    "/proxy/status": ("status", {"GET": "status"}),
    "/ofrep/v1/evaluate/flags/{key}": ("ofrep_flag", {"POST": "ofrep_flag"}),
    "/ofrep/v1/evaluate/flags": ("ofrep_flags", {"POST": "ofrep_flags"}),
    "/sse/environments/{key}/stream": ("stream", {"GET": "stream"}),
    "/proxy/webhooks/flagsmith": ("webhook", {"POST": "webhook"}),
}


def _allowed(methods: dict[str, str]) -> bytes:
    return ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])})).encode()


# raw path (both spellings) → (the route as Flagsmith's API labels metrics: its template, the Allow header)
ROUTE_BY_PATH: dict[bytes, tuple[str, bytes]] = {
    spelling: (path, _allowed(methods))
    for path, (_, methods) in ROUTES.items()
    if "{" not in path
    for spelling in (path.rstrip("/").encode(), path.rstrip("/").encode() + b"/")
}
# paths with one `{param}` segment: (prefix up to the parameter, what follows it, route template, Allow header)
ROUTE_BY_PREFIX: list[tuple[bytes, bytes, str, bytes]] = [
    (path[: path.index("{")].encode(), path[path.index("}") + 1 :].encode(), path, _allowed(methods))
    for path, (_, methods) in ROUTES.items()
    if "{" in path
]


def _header_key(request: Request) -> bytes | None:
    return request.get_first_header(b"x-environment-key")


def _path_key(request: Request) -> bytes | None:
    key = client_key_of(raw_path(request))
    return key.encode() if key is not None else None


# route template → how the edge controls read its environment key (server keys have their own allow list)
KEY_OF: dict[str, Callable[[Request], bytes | None]] = {
    "/api/v1/flags/": _header_key,
    "/api/v1/identities/": _header_key,
    "/api/v1/environment-document/": _header_key,
    "/api/v1/analytics/flags/": _header_key,
    "/ofrep/v1/evaluate/flags/{key}": request_key,
    "/ofrep/v1/evaluate/flags": request_key,
    "/sse/environments/{key}/stream": _path_key,
}


def route_of(path: bytes) -> tuple[str, bytes] | None:
    """(route template, Allow header) of the route `path` belongs to, whatever method it was sent with."""
    route = ROUTE_BY_PATH.get(path)
    if route is None:
        for prefix, suffix, template, allow in ROUTE_BY_PREFIX:
            if path.startswith(prefix):
                param = path[len(prefix) :].removesuffix(b"/")
                if suffix:
                    if not param.endswith(suffix):
                        continue
                    param = param[: -len(suffix)]
                if param and b"/" not in param:
                    return template, allow
    return route


class ProxyApp:
    """The routes, bound to one worker's Store."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.body_reader = BodyReader(settings.max_request_body_bytes, settings.request_body_timeout_seconds)
        self.cors = Cors(settings.allow_origins)
        self.identities = IdentityResponses(store.cache)
        self.pid = str(os.getpid()).encode()
        self.usage = store.counters.usage
        self.ofrep = OfrepRoutes(store, self.body_reader.read)
        self.realtime = StreamHub(settings.realtime, store)
        self.webhooks = WebhookReceiver(settings.webhook, lambda: store.area, settings.shared_redis)
        self.controls = EdgeControls(settings, lambda: store.area)

    # -- flags -----------------------------------------------------------------------------------
    async def flags(self, request: Request) -> Response:
        kind, state = self.store.resolve(request.get_first_header(b"x-environment-key"))
        query = raw_query(request)
        feature = query_param(query, "feature") if query else None
        if feature:
            body = state.flag(kind, feature)
            if body is None:
                raise NotFound(f"feature '{feature}' not found")
            return self._ok(request, body, state, "flags")
        return self._ok(request, state.flags(kind), state, "flags")

    # -- identities ------------------------------------------------------------------------------
    async def identities_get(self, request: Request) -> Response:
        kind, state = self.store.resolve(request.get_first_header(b"x-environment-key"))
        identifier = parse_identity_query(raw_query(request))
        return await self._identity(request, kind, state, identifier, [], {})

    async def identities_post(self, request: Request) -> Response:
        key = request.get_first_header(b"x-environment-key")
        self.store.resolve(key)  # 401/503 before reading a body
        raw = await self.body_reader.read(request)
        identifier, echo, traits = parse_identity_body(raw, request.get_first_header(b"content-type"))
        # Resolve again: a new state may have been swapped in while the body was read.
        kind, state = self.store.resolve(key)
        return await self._identity(request, kind, state, identifier, echo, traits)

    async def _identity(
        self,
        request: Request,
        kind: KeyKind,
        state: Served,
        identifier: str,
        echo: list[dict[str, Any]],
        traits: dict[str, Any],
    ) -> Response:
        await state.ready_for_identities()
        body = self.identities.body(kind, state, identifier, echo, traits, accepts_gzip(request))
        return self._ok(request, body, state, "identities")

    def _ok(self, request: Request, body: Body, state: Served, resource: str) -> Response:
        # Usage reporting (with a proxy_key) counts successful answers per environment and resource.
        if self.usage is not None:
            self.usage.increment(state.client_key, resource)
        return send(request, body, state)

    # -- analytics -------------------------------------------------------------------------------
    async def analytics(self, request: Request) -> Response:
        key = request.get_first_header(b"x-environment-key")
        self.store.resolve(key)
        raw = await self.body_reader.read(request)
        _, state = self.store.resolve(key)
        # Only features the environment has are counted: invented names cannot grow buffers.
        counts, ignored = parse_analytics_body(raw, state.feature_names)
        self.store.counters.analytics.record(state.client_key, counts)
        if ignored:
            metrics.analytics_ignored[0] += ignored
        return json_response(200, b"{}")

    # -- environment document --------------------------------------------------------------------
    async def environment_document(self, request: Request) -> Response:
        key = request.get_first_header(b"x-environment-key")
        kind, state = self.store.resolve(key)
        if kind is not KeyKind.SERVER:
            raise Unauthorized("the environment document is served to server-side keys only")
        # ETag (a hash of the document) for proxies polling this one, Last-Modified for everyone else
        etag = state.etag_gzip if gzip_chosen(request, state.document) else state.etag
        validators = [(b"etag", etag)]
        if state.last_modified is not None:
            validators.append((b"last-modified", state.last_modified))
        match = request.get_first_header(b"if-none-match")
        if match is not None:  # RFC 9110 13.2.2: If-None-Match, when sent, decides alone
            if none_match(match, etag):
                return self._not_modified(state, validators)
        elif state.last_modified is not None:
            since = request.get_first_header(b"if-modified-since")
            if since is not None and not_modified(since, state.last_modified):
                return self._not_modified(state, validators)
        response = self._ok(request, state.document, state, "environment-document")
        for name, value in validators:
            response.add_header(name, value)
        return response

    @staticmethod
    def _not_modified(state: Served, validators: list[tuple[bytes, bytes]]) -> Response:
        # a 304 carries what the 200 would have: its validators and Vary
        vary = [(b"vary", b"Accept-Encoding")] if state.document.gzip is not None else []
        return Response(304, validators + vary, None)

    # -- OpenFeature remote evaluation (proxy/http/ofrep.py) -------------------------------------------
    async def ofrep_flag(self, request: Request) -> Response:
        return await self.ofrep.flag(request)

    async def ofrep_flags(self, request: Request) -> Response:
        return await self.ofrep.flags(request)

    # -- real-time stream and webhook refresh (proxy/http/stream.py, proxy/http/webhook.py) ------------------
    async def stream(self, request: Request) -> Response:
        if not self.settings.realtime.enabled:
            raise NotFound("real-time streams are off (realtime.enabled)")
        return await self.realtime.handle(request)

    async def webhook(self, request: Request) -> Response:
        return await self.webhooks.handle(request, self.body_reader.read)

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
            self.settings, store.keys.client_keys, store.status, store.build_errors, time.time(), waiting, details
        )
        # What the answering worker has loaded; with show_details also which worker it is (its pid).
        headers = [(b"x-edge-proxy-generation", str(store.generation).encode())]
        if details:
            headers.append((b"x-edge-proxy-worker", self.pid))
        return Response(status, headers, Content(JSON, body))

    async def status(self, request: Request) -> Response:
        if not authorized(self.settings, request.get_first_header(b"authorization")):
            raise Unauthorized("GET /proxy/status needs 'Authorization: Bearer <status_token>'")
        return json_response(200, status_body(self.settings, self.store))

    async def liveness(self, request: Request) -> Response:
        return Response(200, None, None)

    async def metrics(self, request: Request) -> Response:
        self.store.counters.flush_metrics(self.store.generation)
        return Response(200, None, Content(metrics.CONTENT_TYPE.encode(), metrics.render()))

    # -- 404 / 405 / preflight -------------------------------------------------------------------
    async def fallback(self, request: Request) -> Response:
        if request.method == "OPTIONS" and request.get_first_header(b"access-control-request-method"):
            return self.cors.preflight(request)
        route = route_of(raw_path(request))
        if route is None:
            return json_response(404, NOT_FOUND_BODY)
        return Response(405, [(b"allow", route[1])], Content(JSON, METHOD_NOT_ALLOWED_BODY))

    # -- the one place errors become responses ---------------------------------------------------
    async def middleware(self, request: Request, handler: Handler) -> Response:
        if self.controls.active:  # access lists, rate limits or traces: the one test when all are off
            return await self._controlled(request, handler)
        started = time.perf_counter()
        try:
            response = await handler(request)
        except Exception as error:
            response = self._error_response(request, error)
        origin = request.get_first_header(b"origin")
        if origin is not None:
            self.cors.add_headers(response, origin)
        route = route_of(raw_path(request))
        metrics.observe(
            route[0] if route else "unmatched", request.method, response.status, time.perf_counter() - started
        )
        return response

    async def _controlled(self, request: Request, handler: Handler) -> Response:
        """The middleware with the edge controls (proxy/http/edge_controls.py) on."""
        started = time.perf_counter()
        controls = self.controls
        route = route_of(raw_path(request))
        template = route[0] if route else None
        scope = request.scope
        headers = scope["headers"]
        span = controls.start_span(request.method, template, headers) if controls.tracing is not None else None
        group = ROUTE_GROUPS.get(template, Group.OPEN) if template is not None else Group.OPEN
        key_of = KEY_OF.get(template) if template is not None else None
        key = key_of(request) if key_of is not None else None
        refusal = controls.check(group, scope.get("client"), headers, key) if group is not Group.OPEN else None
        if refusal is not None:
            response = Response(refusal.status, refusal.headers, Content(JSON, refusal.body))
        else:
            try:
                response = await handler(request)
            except Exception as error:
                response = self._error_response(request, error)
        origin = request.get_first_header(b"origin")
        if origin is not None:
            self.cors.add_headers(response, origin)
        metrics.observe(template or "unmatched", request.method, response.status, time.perf_counter() - started)
        if span is not None:
            controls.end_span(span, response.status, self.store.environment_id_of(key))
        return response

    def _error_response(self, request: Request, error: Exception) -> Response:
        if isinstance(error, ProxyError):
            response = json_response(error.status, error.body())
            if error.status == 408:
                response.add_header(b"connection", b"close")
            return response
        if isinstance(error, MessageAborted):
            # The client went away mid-body: its mistake, not ours. Counted (as nginx's 499), never a traceback.
            log.debug(
                "client disconnected before sending the whole body: %s", raw_path(request).decode(errors="replace")
            )
            return json_response(499, b'{"status":"client_closed_request","message":"client disconnected"}')
        log.exception(
            "unexpected error serving %s %s",
            request.method,
            raw_path(request).decode(errors="replace"),
            exc_info=error,
        )
        return json_response(500, INTERNAL_ERROR_BODY)


def _plain(method: Handler) -> Handler:
    # BlackSheep marks handlers with an attribute, which bound methods refuse: wrap in a plain function
    # with the exact `(request: Request) -> Response` signature so it is still called unwrapped.
    async def handler(request: Request) -> Response:
        return await method(request)

    handler.__name__ = handler.__qualname__ = method.__name__
    # Real classes, not the strings `from __future__ import annotations` leaves: BlackSheep wraps a handler
    # whose return annotation is not `Response` in an extra `ensure_response` layer (measured +1 µs).
    handler.__annotations__ = {"request": Request, "return": Response}
    return handler


def build_app(settings: Settings, store: Store) -> Application:
    routes = ProxyApp(settings, store)
    router = Router()
    # BlackSheep matches a route with or without its trailing slash: one registration serves both.
    for path, (_, methods) in ROUTES.items():
        for method, name in methods.items():
            handler = _plain(getattr(routes, name))
            router.add(method, path, handler)
            if method == "GET":
                router.add("HEAD", path, handler)
    router.fallback = _plain(routes.fallback)
    app = Application(router=router, show_error_details=False)
    app.middlewares.append(routes.middleware)
    store.stop_streams = routes.realtime.close_all
    return app
