"""Flag analytics: SDKs `POST /api/v1/analytics/flags/` `{feature_name: count}` to the proxy (both peers
answer 404, so the counts were lost). Workers add them up in memory and hand them to the leader through
the shared-memory area (one small file per worker flush); the leader sums them and forwards them to
`{api_url}/analytics/flags/` with the environment's server key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

from proxy import __version__
from proxy.handover import collect
from proxy.identity_request import RequestInvalid
from proxy.settings import Settings, mask_key

log = logging.getLogger("proxy.analytics")

FOLDER = "analytics"
MAX_PENDING_FEATURES = 100_000  # per environment: bounds memory if upstream rejects for a long time


def parse_analytics_body(raw: bytes) -> dict[str, int]:
    """`{feature_name: count}` with non-negative integer counts; raises RequestInvalid (422)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestInvalid(
            [{"type": "json_invalid", "loc": ["body", exc.pos], "msg": "JSON decode error", "input": {}}]
        ) from None
    if not isinstance(data, dict):
        raise RequestInvalid(
            [{"type": "dict_type", "loc": ["body"], "msg": "Input should be a valid dictionary", "input": data}]
        )
    errors = [
        {"type": "int_type", "loc": ["body", name], "msg": "Input should be a non-negative integer", "input": count}
        for name, count in data.items()
        if not isinstance(count, int) or isinstance(count, bool) or count < 0
    ]
    if errors:
        raise RequestInvalid(errors)
    return data


class AnalyticsForwarder:
    """The leader's side: every interval, collect and forward; failed batches are retried next time."""

    def __init__(self, settings: Settings, area: Path, server_key_of: Callable[[str], str | None]) -> None:
        self.area = area
        self.interval = settings.analytics_flush_interval_seconds
        self.server_key_of = server_key_of  # the leader knows discovered environments too
        self.url = None if settings.api_url.lower().startswith("file:") else settings.api_url + "/analytics/flags/"
        self.timeout = settings.api_poll_timeout_seconds
        self.pending: defaultdict[str, Counter[str]] = defaultdict(Counter)

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(
            timeout=self.timeout,
            follow_redirects=False,
            headers={"User-Agent": f"flagsmith-edge-proxy-python/{__version__}"},
        ) as client:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
                try:
                    await self.flush(client)
                except Exception:  # never let analytics take the leader down
                    log.exception("analytics flush failed")

    async def flush(self, client: httpx.AsyncClient) -> None:
        from proxy import metrics

        for client_key, counts in collect(self.area, FOLDER).items():
            self.pending[client_key].update(counts)
        for client_key in list(self.pending):
            counts = self.pending[client_key]
            server_key = self.server_key_of(client_key)
            if self.url is None or server_key is None or not counts:
                metrics.ANALYTICS_EVENTS.labels(outcome="dropped").inc(sum(counts.values()))
                del self.pending[client_key]
                continue
            try:
                response = await client.post(
                    self.url, content=orjson.dumps(counts), headers={"X-Environment-Key": server_key}
                )
            except httpx.HTTPError as exc:
                log.warning("analytics for %s not forwarded (%s); retrying later", mask_key(client_key), exc)
                self._bound(client_key)
                continue
            if response.status_code >= 500:
                log.warning(
                    "analytics for %s: upstream answered %d; retrying later", mask_key(client_key), response.status_code
                )
                self._bound(client_key)
                continue
            outcome = "forwarded" if response.is_success else "rejected"
            if not response.is_success:
                log.warning("analytics for %s rejected with %d; dropped", mask_key(client_key), response.status_code)
            metrics.ANALYTICS_EVENTS.labels(outcome=outcome).inc(sum(counts.values()))
            del self.pending[client_key]

    def _bound(self, client_key: str) -> None:
        counts = self.pending[client_key]
        if len(counts) > MAX_PENDING_FEATURES:
            self.pending[client_key] = Counter(dict(counts.most_common(MAX_PENDING_FEATURES)))
