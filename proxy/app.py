"""BlackSheep routes: thin, bytes in / bytes out.

Handlers take exactly `(request: Request) -> Response` so BlackSheep calls them unwrapped (no binders).
Errors are exceptions mapped to responses in one place, `_respond_errors`, which also adds CORS headers
and counts requests for metrics. Environment-level bodies are pre-encoded in `EnvironmentState`; identity
responses are evaluated once and kept in the per-worker LRU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any

from blacksheep import Application, Content, Request, Response
from blacksheep.exceptions import MessageAborted
from blacksheep.server.routing import Router

from proxy import metrics
from proxy.analytics import parse_analytics_body
from proxy.environment import GZIP_MIN_BYTES, Body, EnvironmentState, KeyKind
from proxy.errors import (
    INTERNAL_ERROR_BODY,
    METHOD_NOT_ALLOWED_BODY,
    NOT_FOUND_BODY,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    Unauthorized,
)
from proxy.health import check_health
from proxy.identity_request import parse_identity_body, parse_identity_query, query_param
from proxy.ofrep import OfrepRoutes
from proxy.realtime import StreamHub
from proxy.settings import Settings
from proxy.store import Store
from proxy.webhook import WebhookReceiver

log = logging.getLogger("proxy.app")

JSON = b"application/json"
DOCUMENT_UPDATED_AT = b"x-flagsmith-document-updated-at"
PREFLIGHT_METHODS = b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"

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


def _accepts_gzip(request: Request) -> bool:
    accept = request.get_first_header(b"accept-encoding")
    return accept is not None and b"gzip" in accept.lower() and b"gzip;q=0" not in accept.replace(b" ", b"")


def _json(status: int, data: bytes) -> Response:
    return Response(status, None, Content(JSON, data))


def _send(request: Request, body: Body, state: EnvironmentState) -> Response:
    headers = []
    data = body.plain
    if len(data) >= GZIP_MIN_BYTES:
        headers.append((b"vary", b"Accept-Encoding"))
        if body.gzip is not None and _accepts_gzip(request):
            data = body.gzip
            headers.append((b"content-encoding", b"gzip"))
    if state.updated_at_header is not None:
        headers.append((DOCUMENT_UPDATED_AT, state.updated_at_header))
    return Response(200, headers, Content(JSON, data))


class ProxyApp:
    """The routes, bound to one worker's Store."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.max_body = settings.max_request_body_bytes
        self.body_timeout = settings.request_body_timeout_seconds
        self.allow_any_origin = "*" in settings.allow_origins
        self.allowed_origins = {origin.encode() for origin in settings.allow_origins}
        self.pid = str(os.getpid()).encode()
        self.usage = store.usage
        self.ofrep = OfrepRoutes(store, self._read_body)
        self.realtime = StreamHub(settings.realtime, store)
        self.webhooks = WebhookReceiver(settings.webhook, lambda: store.area)

    # -- flags -----------------------------------------------------------------------------------
    async def flags(self, request: Request) -> Response:
        kind, state = self.store.resolve(request.get_first_header(b"x-environment-key"))
        view = state.views[kind]
        raw_query = request._raw_query
        feature = query_param(raw_query, "feature") if raw_query else None
        if feature:
            body = view.single.get(feature)
            if body is None:
                raise NotFound(f"feature '{feature}' not found")
            return self._ok(request, body, state, "flags")
        return self._ok(request, view.flags, state, "flags")

    # -- identities ------------------------------------------------------------------------------
    async def identities_get(self, request: Request) -> Response:
        kind, state = self.store.resolve(request.get_first_header(b"x-environment-key"))
        identifier = parse_identity_query(request._raw_query)
        return self._identity(request, kind, state, identifier, [], {})

    async def identities_post(self, request: Request) -> Response:
        key = request.get_first_header(b"x-environment-key")
        self.store.resolve(key)  # 401/503 before reading a body
        raw = await self._read_body(request)
        identifier, echo, traits = parse_identity_body(raw, request.get_first_header(b"content-type"))
        # Resolve again: a new state may have been swapped in while the body was read.
        kind, state = self.store.resolve(key)
        return self._identity(request, kind, state, identifier, echo, traits)

    def _identity(
        self,
        request: Request,
        kind: KeyKind,
        state: EnvironmentState,
        identifier: str,
        echo: list[dict[str, Any]],
        traits: dict[str, Any],
    ) -> Response:
        cache = self.store.cache
        # (kind, identifier, traits as echoed): the response depends on nothing else. The type is part of
        # the key because 1, 1.0 and True are equal (and hash alike) in Python but not in the response.
        cache_key = (kind, identifier, tuple((t["trait_key"], type(v := t["trait_value"]), v) for t in echo))
        body = cache.get(state.client_key, cache_key) if cache is not None else None
        gzip_wanted = _accepts_gzip(request)
        if body is None:
            data = state.identity_body(kind, identifier, echo, traits)
            body = Body.of(data) if gzip_wanted else Body(data, None)
            if cache is not None:
                cache.put(state.client_key, cache_key, body)
        elif gzip_wanted and body.gzip is None and len(body.plain) >= GZIP_MIN_BYTES:
            body = Body.of(body.plain)
            cache.put(state.client_key, cache_key, body)
        return self._ok(request, body, state, "identities")

    def _ok(self, request: Request, body: Body, state: EnvironmentState, resource: str) -> Response:
        # Usage reporting (with a proxy_key) counts successful answers per environment and resource.
        if self.usage is not None:
            self.usage.increment(state.client_key, resource)
        return _send(request, body, state)

    async def _read_body(self, request: Request) -> bytes:
        length = request.get_first_header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
        if request.content is None:
            return b""
        # A body that trickles in (or never completes) must not hold a connection and a task forever.
        try:
            async with asyncio.timeout(self.body_timeout):
                return await self._read_within_cap(request, length)
        except TimeoutError:
            raise RequestTimeout(
                f"request body not received within {self.body_timeout:g} s (request_body_timeout_seconds)"
            ) from None

    async def _read_within_cap(self, request: Request, length: bytes | None) -> bytes:
        if (length is not None and length.isdigit()) or not hasattr(request.content, "stream"):
            # A declared length within the cap (or a body already in memory): one read.
            body = await request.read() or b""
            if len(body) > self.max_body:
                raise PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
            return body
        chunks = bytearray()  # chunked: count as it arrives
        async for chunk in request.content.stream():
            if chunk:
                chunks += chunk
                if len(chunks) > self.max_body:
                    raise PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
        return bytes(chunks)

    # -- analytics -------------------------------------------------------------------------------
    async def analytics(self, request: Request) -> Response:
        key = request.get_first_header(b"x-environment-key")
        self.store.resolve(key)
        raw = await self._read_body(request)
        _, state = self.store.resolve(key)
        # Only features the environment has are counted: invented names cannot grow buffers.
        counts, ignored = parse_analytics_body(raw, state.features)
        self.store.analytics.record(state.client_key, counts)
        if ignored:
            metrics.analytics_ignored[0] += ignored
        return _json(200, b"{}")

    # -- environment document --------------------------------------------------------------------
    async def environment_document(self, request: Request) -> Response:
        key = request.get_first_header(b"x-environment-key")
        kind, state = self.store.resolve(key)
        if kind is not KeyKind.SERVER:
            raise Unauthorized("the environment document is served to server-side keys only")
        if state.last_modified is not None:
            since = request.get_first_header(b"if-modified-since")
            if since is not None and _not_modified(since, state):
                return Response(304, [(b"last-modified", state.last_modified)], None)
        response = self._ok(request, state.document, state, "environment-document")
        if state.last_modified is not None:
            response.add_header(b"last-modified", state.last_modified)
        return response

    # -- OpenFeature remote evaluation (proxy/ofrep.py) -------------------------------------------
    async def ofrep_flag(self, request: Request) -> Response:
        return await self.ofrep.flag(request)

    async def ofrep_flags(self, request: Request) -> Response:
        return await self.ofrep.flags(request)

    # -- real-time stream and webhook refresh (proxy/realtime.py, proxy/webhook.py) ------------------
    async def stream(self, request: Request) -> Response:
        if not self.settings.realtime.enabled:
            raise NotFound("real-time streams are off (realtime.enabled)")
        return await self.realtime.handle(request)

    async def webhook(self, request: Request) -> Response:
        return await self.webhooks.handle(request, self._read_body)

    # -- health and metrics ----------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        store = self.store
        waiting = bool(self.settings.proxy_key) and not store.discovered
        status, body = check_health(
            self.settings, store.client_keys, store.status, store.build_errors, time.time(), waiting
        )
        # What the answering worker has loaded; with show_details also which worker it is (its pid).
        headers = [(b"x-edge-proxy-generation", str(store.generation).encode())]
        if self.settings.health_check.show_details:
            headers.append((b"x-edge-proxy-worker", self.pid))
        return Response(status, headers, Content(JSON, body))

    async def liveness(self, request: Request) -> Response:
        return Response(200, None, None)

    async def metrics(self, request: Request) -> Response:
        self.store.flush_metrics()
        return Response(200, None, Content(metrics.CONTENT_TYPE.encode(), metrics.render()))

    # -- 404 / 405 / preflight -------------------------------------------------------------------
    async def fallback(self, request: Request) -> Response:
        if request.method == "OPTIONS" and request.get_first_header(b"access-control-request-method"):
            return self._preflight(request)
        route = route_of(request._path)
        if route is None:
            return _json(404, NOT_FOUND_BODY)
        return Response(405, [(b"allow", route[1])], Content(JSON, METHOD_NOT_ALLOWED_BODY))

    def _preflight(self, request: Request) -> Response:
        response = Response(200, None, Content(b"text/plain; charset=utf-8", b"OK"))
        origin = request.get_first_header(b"origin")
        if origin is not None and self._origin_allowed(origin):
            response.add_header(b"vary", b"Origin")
            response.add_header(b"access-control-allow-methods", PREFLIGHT_METHODS)
            response.add_header(b"access-control-max-age", b"600")
            response.add_header(b"access-control-allow-credentials", b"true")
            response.add_header(b"access-control-allow-origin", origin)
            requested = request.get_first_header(b"access-control-request-headers")
            if requested:
                response.add_header(b"access-control-allow-headers", requested)
        return response

    def _origin_allowed(self, origin: bytes) -> bool:
        return self.allow_any_origin or origin in self.allowed_origins

    # -- the one place errors become responses ---------------------------------------------------
    async def middleware(self, request: Request, handler: Handler) -> Response:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except ProxyError as error:
            response = _json(error.status, error.body())
            if error.status == 408:
                response.add_header(b"connection", b"close")
        except MessageAborted:
            # The client went away mid-body: its mistake, not ours. Counted (as nginx's 499), never a traceback.
            log.debug("client disconnected before sending the whole body: %s", request._path.decode(errors="replace"))
            response = _json(499, b'{"status":"client_closed_request","message":"client disconnected"}')
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request._path.decode(errors="replace"))
            response = _json(500, INTERNAL_ERROR_BODY)
        origin = request.get_first_header(b"origin")
        if origin is not None:
            self._add_cors(response, origin)
        route = route_of(request._path)
        metrics.observe(
            route[0] if route else "unmatched", request.method, response.status, time.perf_counter() - started
        )
        return response

    def _add_cors(self, response: Response, origin: bytes) -> None:
        if not self._origin_allowed(origin) or response.has_header(b"access-control-allow-origin"):
            return
        # Echo the origin (never `*` with credentials), let browser SDKs read the document timestamp.
        response.add_header(b"access-control-allow-origin", origin)
        response.add_header(b"access-control-allow-credentials", b"true")
        # ETag: browser OFREP providers poll the bulk endpoint with If-None-Match.
        response.add_header(b"access-control-expose-headers", DOCUMENT_UPDATED_AT + b", etag")
        vary = response.get_first_header(b"vary")
        response.set_header(b"vary", vary + b", Origin" if vary else b"Origin")


def _not_modified(since: bytes, state: EnvironmentState) -> bool:
    try:
        when = parsedate_to_datetime(since.decode("latin-1"))
    except (TypeError, ValueError):
        return False
    return state.updated_at is not None and when.tzinfo is not None and state.updated_at.replace(microsecond=0) <= when


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
