"""The hot routes, framework-free: a `Call` in, a `Reply` out (proxy/http/exchange.py).

Flags, identities (GET and POST), the environment document and OFREP (proxy/http/ofrep.py). `serve` is the
one wrapper every hot request of either path goes through (the fast path calls it, and so do BlackSheep's
route functions for these routes); BlackSheep's other routes get the same steps from `admit` and `finish`:
the edge controls when one is on (access lists, rate limits, spans: proxy/http/edge_controls.py), errors
rendered by `error_reply`, CORS headers, metrics. Environment-level bodies are pre-encoded in the state;
identity answers come from the one pipeline (proxy/http/identities.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.area.bodies import Body, KeyKind
from proxy.config.settings import Settings
from proxy.http.cors import Cors
from proxy.http.edge_controls import ROUTE_GROUPS, EdgeControls, Group
from proxy.http.errors import NotFound, Unauthorized, error_reply
from proxy.http.exchange import Call, Headers, Reply
from proxy.http.identities import IdentityPipeline, IdentityRequest, parse_identity
from proxy.http.identity_request import is_json_content_type, parse_identity_query, query_param
from proxy.http.ofrep import OfrepRoutes, request_key
from proxy.http.request_body import BodyReader
from proxy.http.responses import accepts_gzip, gzip_chosen, none_match, not_modified, send
from proxy.http.stream import client_key_of
from proxy.metrics import prometheus as metrics
from proxy.worker.store import Store

HotHandler = Callable[[Call], Awaitable[Reply]]


def _header_key(call: Call) -> bytes | None:
    return call.header(b"x-environment-key")


def _path_key(call: Call) -> bytes | None:
    key = client_key_of(call.path)
    return key.encode() if key is not None else None


# route template → how the edge controls read its environment key (server keys have their own allow list)
KEY_OF: dict[str, Callable[[Call], bytes | None]] = {
    "/api/v1/flags/": _header_key,
    "/api/v1/identities/": _header_key,
    "/api/v1/environment-document/": _header_key,
    "/api/v1/analytics/flags/": _header_key,
    "/ofrep/v1/evaluate/flags/{key}": request_key,
    "/ofrep/v1/evaluate/flags": request_key,
    "/sse/environments/{key}/stream": _path_key,
}


class HotRoutes:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self.body_reader = BodyReader(settings.max_request_body_bytes, settings.request_body_timeout_seconds)
        self.cors = Cors(settings.allow_origins)
        self.controls = EdgeControls(settings, lambda: store.area)
        self.identities = IdentityPipeline(store, self.body_reader)
        self.ofrep = OfrepRoutes(self.identities)
        # handler name in the route table (proxy/http/routes.py HOT) → handler
        self.handlers: dict[str, HotHandler] = {
            "flags": self.flags,
            "identities_get": self.identities_get,
            "identities_post": self.identities_post,
            "environment_document": self.environment_document,
            "ofrep_flag": self.ofrep.flag,
            "ofrep_flags": self.ofrep.flags,
        }

    # -- the one wrapper -------------------------------------------------------------------------
    async def serve(self, call: Call, template: str, handler: HotHandler) -> Reply:
        if self.controls.active:  # access lists, rate limits or spans: the one test when all are off
            return await self._controlled(call, template, handler)
        started = time.perf_counter()
        try:
            reply = await handler(call)
        except Exception as error:
            reply = error_reply(error, call.method, call.path)
        self.finish(call.method, call.header(b"origin"), template, reply.status, reply.headers, started)
        return reply

    async def _controlled(self, call: Call, template: str, handler: HotHandler) -> Reply:
        started = time.perf_counter()
        refusal, span, key = self.admit(call, template)
        if refusal is not None:
            reply = refusal
        else:
            try:
                reply = await handler(call)
            except Exception as error:
                reply = error_reply(error, call.method, call.path)
        self.finish(call.method, call.header(b"origin"), template, reply.status, reply.headers, started, span, key)
        return reply

    def admit(self, call: Call, template: str | None) -> tuple[Reply | None, Any, bytes | None]:
        """With an edge control on: (the refusal to send or None, the request's span, its environment key)."""
        controls = self.controls
        span = controls.start_span(call.method, template, call.headers) if controls.tracing is not None else None
        group = ROUTE_GROUPS.get(template, Group.OPEN) if template is not None else Group.OPEN
        key_of = KEY_OF.get(template) if template is not None else None
        key = key_of(call) if key_of is not None else None
        refusal = controls.check(group, call.client, call.headers, key) if group is not Group.OPEN else None
        if refusal is None:
            return None, span, key
        return Reply(refusal.status, list(refusal.headers), refusal.body), span, key

    def finish(
        self,
        method: str,
        origin: bytes | None,
        template: str | None,
        status: int,
        headers: Headers,
        started: float,
        span: Any = None,
        key: bytes | None = None,
    ) -> None:
        """What every answer gets, on either path: CORS headers for an allowed origin, its metrics, its span."""
        if origin is not None:
            self.cors.add_headers(headers, origin)
        metrics.observe(template or "unmatched", method, status, time.perf_counter() - started)
        if span is not None:
            self.controls.end_span(span, status, self.store.environment_id_of(key))

    # -- flags -----------------------------------------------------------------------------------
    async def flags(self, call: Call) -> Reply:
        kind, state = self.store.resolve(call.header(b"x-environment-key"))
        query = call.query
        feature = query_param(query, "feature") if query else None
        if feature:
            body = state.flag(kind, feature)
            if body is None:
                raise NotFound(f"feature '{feature}' not found")
        else:
            body = state.flags(kind)
        self.identities.count(state, "flags")
        return send(call.header(b"accept-encoding"), body, state)

    # -- identities ------------------------------------------------------------------------------
    async def identities_get(self, call: Call) -> Reply:
        kind, state = self.store.resolve(call.header(b"x-environment-key"))
        identifier = parse_identity_query(call.query)
        accept = call.header(b"accept-encoding")
        parsed = IdentityRequest(kind, identifier, [], {}, len(identifier))
        body = await self.identities.answer(kind, state, parsed, accepts_gzip(accept))
        self.identities.count(state, "identities")
        return send(accept, body, state)

    async def identities_post(self, call: Call) -> Reply:
        accept = call.header(b"accept-encoding")
        key = call.header(b"x-environment-key")
        json = is_json_content_type(call.header(b"content-type"))  # else 422, whatever the body
        state, body = await self.identities.post(call, key, "identities", parse_identity, accepts_gzip(accept), json)
        self.identities.count(state, "identities")
        return send(accept, body, state)

    # -- environment document --------------------------------------------------------------------
    async def environment_document(self, call: Call) -> Reply:
        kind, state = self.store.resolve(call.header(b"x-environment-key"))
        if kind is not KeyKind.SERVER:
            raise Unauthorized("the environment document is served to server-side keys only")
        accept = call.header(b"accept-encoding")
        document = state.document  # once: its bytes are copied out of the shared mapping
        # ETag (a hash of the document) for proxies polling this one, Last-Modified for everyone else
        etag = state.etag_gzip if gzip_chosen(accept, document) else state.etag
        validators = [(b"etag", etag)]
        last_modified = state.last_modified
        if last_modified is not None:
            validators.append((b"last-modified", last_modified))
        match = call.header(b"if-none-match")
        if match is not None:  # RFC 9110 13.2.2: If-None-Match, when sent, decides alone
            if none_match(match, etag):
                return _not_modified(document, validators)
        elif last_modified is not None:
            since = call.header(b"if-modified-since")
            if since is not None and not_modified(since, last_modified):
                return _not_modified(document, validators)
        self.identities.count(state, "environment-document")
        reply = send(accept, document, state)
        reply.headers += validators
        return reply


def _not_modified(document: Body, validators: Headers) -> Reply:
    # a 304 carries what the 200 would have: its validators and Vary
    vary = [(b"vary", b"Accept-Encoding")] if document.gzip is not None else []
    return Reply(304, validators + vary, None)
