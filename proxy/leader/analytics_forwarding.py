"""The leader's side of flag analytics: sum the workers' hand-overs, forward them upstream per environment
with its server key (`{api_url}/analytics/flags/`). 5xx and network errors keep the counts (in the
hand-over folder's pending file, so a restarted leader still has them) for the next flush; 4xx drop them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

from proxy.area.mailboxes import Inbox
from proxy.area.names import ANALYTICS
from proxy.config.masking import mask_key
from proxy.config.settings import Settings
from proxy.leader.upstream import flush_every, upstream_client
from proxy.metrics import prometheus as metrics

log = logging.getLogger("proxy.leader")


class AnalyticsForwarder:
    """Every interval, collect and forward; what failed is retried next time."""

    def __init__(self, settings: Settings, area: Path, server_key_of: Callable[[str], str | None]) -> None:
        self.inbox = Inbox(area, ANALYTICS)
        self.interval = settings.analytics_flush_interval_seconds
        self.server_key_of = server_key_of  # the leader knows discovered environments too
        self.url = None if settings.api_url.lower().startswith("file:") else settings.api_url + "/analytics/flags/"
        self.settings = settings

    async def run(self, stop: asyncio.Event) -> None:
        async with upstream_client(self.settings) as client:
            await flush_every(self.interval, stop, lambda: self.flush(client), "analytics")

    async def flush(self, client: httpx.AsyncClient) -> None:
        remainder: dict[str, dict[str, int]] = {}
        for client_key, counts in self.inbox.take().items():
            total = sum(counts.values())
            server_key = self.server_key_of(client_key)
            if self.url is None or server_key is None or not counts:
                metrics.ANALYTICS_EVENTS.labels(outcome="dropped").inc(total)
                continue
            try:
                response = await client.post(
                    self.url, content=orjson.dumps(counts), headers={"X-Environment-Key": server_key}
                )
            except httpx.HTTPError as exc:
                log.warning("analytics for %s not forwarded (%s); retrying later", mask_key(client_key), exc)
                metrics.ANALYTICS_EVENTS.labels(outcome="retried").inc(total)
                remainder[client_key] = dict(counts)
                continue
            if response.status_code >= 500:
                log.warning(
                    "analytics for %s: upstream answered %d; retrying later", mask_key(client_key), response.status_code
                )
                metrics.ANALYTICS_EVENTS.labels(outcome="retried").inc(total)
                remainder[client_key] = dict(counts)
                continue
            outcome = "forwarded" if response.is_success else "rejected"
            if not response.is_success:
                log.warning("analytics for %s rejected with %d; dropped", mask_key(client_key), response.status_code)
            metrics.ANALYTICS_EVENTS.labels(outcome=outcome).inc(total)
        self.inbox.settle(remainder)
