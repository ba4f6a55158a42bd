"""Edge controls on the request path: network allow lists per route group, per-client rate limits and
request spans (OpenTelemetry), behind one framework-free object.

`EdgeControls.check(group, client, headers, key)` takes what any ASGI server hands over (the scope's
`client` tuple, its raw `(name, value)` header pairs, the environment key the route reads) and answers
None (go on) or a `Refusal` (status, JSON body, extra headers) that the caller sends with its CORS headers:
403 when the client's network is not allowed, 429 past a rate limit.
BlackSheep's middleware (`ProxyApp.middleware`) calls it, and so can a raw-ASGI fast path. With every
control off, `EdgeControls.active` is False and the caller skips everything on one attribute test.

Route groups: `FLAGS` (flags, identities, OFREP, the environment document) and `SDK` (streams, analytics)
are checked against `access.public`, or `access.server_keys` when the key is a server-side key (`ser.`;
that list falls back to `access.public` when unset); `OPERATIONS` (`/metrics`, `/proxy/status`) against
`access.operations`. Health stays open for probes; only its details are kept to `access.operations`
(`EdgeControls.allowed`). Everything else (liveness, the webhook, which is signed, unknown paths) is open.

Rate limits (`rate_limits.per_client_address`, `rate_limits.per_key`) apply to the `FLAGS` group, after
the allow lists. Their token buckets are shared by the node's workers (`proxy/area/buckets.py`), so a limit
holds whatever worker a connection lands on; a 429 names the limit and carries `Retry-After`.

Request spans (`proxy/metrics/tracing.py`, on when the `OTEL_*` variables say where to send them):
`start_span(method, route template, headers)` before the checks, `end_span(span, status, environment id)`
after the answer; refusals get spans too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import orjson

from proxy.area.buckets import BucketTable, table_path
from proxy.config.sections import SERVER_KEY_PREFIX, RateLimit
from proxy.config.settings import Settings
from proxy.http.client_address import ClientAddresses, Networks
from proxy.metrics import prometheus as metrics
from proxy.metrics import tracing

log = logging.getLogger("proxy.edge")

SERVER_PREFIX = SERVER_KEY_PREFIX.encode()
LIMITS = ("per_client_address", "per_key")

Headers = Iterable[tuple[bytes, bytes]]
Client = tuple[str, int] | list[object] | None


class Group(IntEnum):
    OPEN = 0
    FLAGS = 1
    SDK = 2
    OPERATIONS = 3


# route template (as `proxy.http.app.ROUTES` has it) → group; a route not listed is open
ROUTE_GROUPS: dict[str, Group] = {
    "/api/v1/flags/": Group.FLAGS,
    "/api/v1/identities/": Group.FLAGS,
    "/api/v1/environment-document/": Group.FLAGS,
    "/ofrep/v1/evaluate/flags/{key}": Group.FLAGS,
    "/ofrep/v1/evaluate/flags": Group.FLAGS,
    "/api/v1/analytics/flags/": Group.SDK,
    "/sse/environments/{key}/stream": Group.SDK,
    "/metrics": Group.OPERATIONS,
    "/proxy/status": Group.OPERATIONS,
}


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    body: bytes  # JSON that says what was refused and why
    headers: list[tuple[bytes, bytes]]


def _forbidden(address: str, setting: str) -> Refusal:
    message = f"client address {address} is not allowed on this route ({setting})"
    return Refusal(403, orjson.dumps({"status": "forbidden", "message": message}), [])


def _too_many(limit: str, rule: RateLimit, wait: float, whose: str) -> Refusal:
    retry_after = max(1, math.ceil(wait))
    message = (
        f"more than {rule.requests_per_second:g} requests per second (burst {rule.capacity}) {whose} "
        f"(rate_limits.{limit}); retry after {retry_after} s"
    )
    body = {"status": "too_many_requests", "message": message, "limit": limit, "retry_after": retry_after}
    return Refusal(429, orjson.dumps(body), [(b"retry-after", str(retry_after).encode())])


class Limiter:
    """One rate limit: its rule and its bucket table (shared through the area once attached)."""

    def __init__(self, name: str, rule: RateLimit, entries: int) -> None:
        self.name = name
        self.rule = rule
        self.rate = rule.requests_per_second
        self.burst = float(rule.capacity)
        self.entries = entries
        self.table: BucketTable | None = None

    def open(self, area: Path | None) -> BucketTable:
        """The node's shared table in `area`; a private one without an area (or when the file is missing)."""
        table = None
        if area is not None:
            try:
                table = BucketTable(table_path(area, self.name))
            except (OSError, ValueError) as exc:
                log.error("rate_limits.%s: shared buckets unavailable, counting per worker: %s", self.name, exc)
        self.table = table or BucketTable(None, self.entries)
        return self.table

    def take(self, name: str | bytes) -> float:
        table = self.table
        if table is None:
            raise RuntimeError("Limiter.open() first")
        return table.take(name, self.rate, self.burst)


class EdgeControls:
    def __init__(
        self, settings: Settings, area: Callable[[], Path | None] = lambda: None, tracer: Any = "from-environment"
    ) -> None:
        """`tracer`: an OpenTelemetry tracer, None for no spans; by default what `OTEL_*` configure."""
        self.addresses = ClientAddresses(settings.trusted_proxies, settings.forwarded_header.value)
        access = settings.access
        public = Networks(access.public) if access.public is not None else None
        server_keys = Networks(access.server_keys) if access.server_keys is not None else public
        operations = Networks(access.operations) if access.operations is not None else None
        # (list for client keys, list for server keys, the setting named in a refusal of each) per group
        self._lists: dict[Group, tuple[Networks | None, Networks | None, str, str]] = {
            Group.FLAGS: (public, server_keys, "access.public", _server_setting(settings)),
            Group.SDK: (public, server_keys, "access.public", _server_setting(settings)),
            Group.OPERATIONS: (operations, operations, "access.operations", "access.operations"),
        }
        self.access = any(networks is not None for networks in (public, server_keys, operations))
        limits = settings.rate_limits
        entries = limits.table_entries
        self.per_address = (
            Limiter("per_client_address", limits.per_client_address, entries) if limits.per_client_address else None
        )
        self.per_key = Limiter("per_key", limits.per_key, entries) if limits.per_key else None
        self.limits = self.per_address is not None or self.per_key is not None
        self._area = area
        self._opened = False
        if tracer == "from-environment":
            tracer = tracing.start("worker")
        self.tracing = tracing.RequestTracer(tracer) if tracer is not None else None
        # The one test callers make: False when no control is on.
        self.active = self.access or self.limits or self.tracing is not None

    def start_span(self, method: str, route: str | None, headers: Headers) -> Any:
        """A request's span (None when traces are off); `route` is the template, never the raw path."""
        return self.tracing.start(method, route, headers) if self.tracing is not None else None

    def end_span(self, span: Any, status: int, environment_id: int | None) -> None:
        if span is not None and self.tracing is not None:
            self.tracing.end(span, status, environment_id)

    def client(self, client: Client, headers: Headers) -> str:
        """The client address (see `proxy.http.client_address`)."""
        return self.addresses.resolve(client, headers)

    def check(self, group: Group, client: Client, headers: Headers, key: bytes | None) -> Refusal | None:
        """None when the request may go on; else the refusal to send (403, 429)."""
        if group is Group.OPEN or (not self.access and group is not Group.FLAGS):
            return None
        address = self.addresses.resolve(client, headers)
        if self.access:
            server = key is not None and key.startswith(SERVER_PREFIX)
            public, server_keys, public_setting, server_setting = self._lists[group]
            networks = server_keys if server else public
            if networks is not None and address not in networks:
                setting = server_setting if server else public_setting
                metrics.access_denied[setting] += 1
                return _forbidden(address, setting)
        if self.limits and group is Group.FLAGS:
            return self._limit(address, key)
        return None

    def _limit(self, address: str, key: bytes | None) -> Refusal | None:
        if not self._opened:
            self.attach(self._area())
        per_address = self.per_address
        if per_address is not None:
            wait = per_address.take(address)
            if wait:
                metrics.rate_limited["per_client_address"] += 1
                return _too_many("per_client_address", per_address.rule, wait, f"from client address {address}")
        per_key = self.per_key
        if per_key is not None and key:
            wait = per_key.take(key)
            if wait:
                metrics.rate_limited["per_key"] += 1
                return _too_many("per_key", per_key.rule, wait, "with this environment key")
        return None

    def attach(self, area: Path | None) -> None:
        """Open the rate limits' tables: the node's shared ones in `area` (a worker, once it follows the area)."""
        for limiter in (self.per_address, self.per_key):
            if limiter is not None:
                limiter.open(area)
        self._opened = True

    def allowed(self, group: Group, client: Client, headers: Headers) -> bool:
        """Whether the client may see what `group` guards without a key (health's details: OPERATIONS)."""
        networks = self._lists[group][0] if group is not Group.OPEN else None
        return networks is None or self.addresses.resolve(client, headers) in networks


def _server_setting(settings: Settings) -> str:
    return "access.server_keys" if settings.access.server_keys is not None else "access.public"
