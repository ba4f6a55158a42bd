"""The one route table: what BlackSheep registers, what the fast path serves, 405 `Allow`, metric labels.

Every GET route also answers HEAD, and every route answers with or without its trailing slash. Routes whose
handlers are in HOT are framework-free (proxy/http/hot.py): the fast path (proxy/http/fast_path.py) serves
them straight from ASGI, and BlackSheep's routes for them adapt to the same handlers.
"""

from __future__ import annotations

# path → (short name, {method: handler}); metrics label a route by its path, as Flagsmith's API does.
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

# The handlers of the hot routes (HotRoutes' methods); the others are BlackSheep handlers (ProxyApp's).
HOT = frozenset({"flags", "identities_get", "identities_post", "environment_document", "ofrep_flag", "ofrep_flags"})


def methods_of(methods: dict[str, str]) -> dict[str, str]:
    """A route's methods with HEAD added wherever GET is."""
    return {**methods, "HEAD": methods["GET"]} if "GET" in methods else methods


def _allowed(methods: dict[str, str]) -> bytes:
    return ", ".join(sorted(methods_of(methods))).encode()


def spellings(path: str) -> tuple[bytes, bytes]:
    """A path without and with its trailing slash."""
    bare = path.rstrip("/").encode()
    return bare, bare + b"/"


# raw path (both spellings) → (the route as Flagsmith's API labels metrics: its template, the Allow header)
ROUTE_BY_PATH: dict[bytes, tuple[str, bytes]] = {
    spelling: (path, _allowed(methods))
    for path, (_, methods) in ROUTES.items()
    if "{" not in path
    for spelling in spellings(path)
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
                param = parameter(path, prefix, suffix)
                if param is not None:
                    return template, allow
    return route


def parameter(path: bytes, prefix: bytes, suffix: bytes) -> bytes | None:
    """The `{param}` segment of `path` (which starts with `prefix`), or None when it is not one segment."""
    param = path[len(prefix) :].removesuffix(b"/")
    if suffix:
        if not param.endswith(suffix):
            return None
        param = param[: -len(suffix)]
    return param if param and b"/" not in param else None


# The fast path's table: raw path (both spellings) → {method: (route template, hot handler)}, and for the
# one hot route with a parameter (OFREP's single flag) its prefix.
HOT_BY_PATH: dict[bytes, dict[str, tuple[str, str]]] = {
    spelling: {method: (path, name) for method, name in methods_of(methods).items()}
    for path, (_, methods) in ROUTES.items()
    if "{" not in path and set(methods.values()) <= HOT
    for spelling in spellings(path)
}
HOT_BY_PREFIX: list[tuple[bytes, bytes, dict[str, tuple[str, str]]]] = [
    (prefix, suffix, {method: (template, name) for method, name in methods_of(ROUTES[template][1]).items()})
    for prefix, suffix, template, _ in ROUTE_BY_PREFIX
    if set(ROUTES[template][1].values()) <= HOT
]
