"""Usage reporting (`proxy_key`): successful answers per environment and resource, to `{api_url}/proxy/usage/`.

Every `usage_flush_interval_seconds` the leader sums the workers' hand-overs and posts rows
`{client_side_key, resource, count}` in batches of at most 1,000, each with its own `Idempotency-Key`.
2xx: accepted. 4xx: dropped (logged), never retried. 5xx, timeouts, network errors: the batch is kept and
resent unchanged, under the same idempotency key, at the next flush; new counts wait for a later flush.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import orjson

from proxy import metrics
from proxy.handover import collect
from proxy.leader.upstream import flush_every, upstream_client
from proxy.settings import Settings

log = logging.getLogger("proxy.leader")

FOLDER = "usage"
MAX_ROWS = 1000


class UsageReporter:
    def __init__(self, settings: Settings, area: Path) -> None:
        assert settings.proxy_key is not None
        self.area = area
        self.url = settings.api_url + "/proxy/usage/"
        self.interval = settings.usage_flush_interval_seconds
        self.proxy_key = settings.proxy_key
        self.settings = settings
        self.counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.pending: list[tuple[str, list[dict[str, Any]]]] = []  # (idempotency key, rows)

    async def run(self, stop: asyncio.Event) -> None:
        async with upstream_client(self.settings, {"X-Proxy-Key": self.proxy_key}) as client:
            await flush_every(self.interval, stop, lambda: self.flush(client), "usage")

    def batches(self) -> list[tuple[str, list[dict[str, Any]]]]:
        for client_key, counts in collect(self.area, FOLDER).items():
            self.counts[client_key].update(counts)
        if self.pending:  # resend only what failed, unchanged; new counts go out later
            batches, self.pending = self.pending, []
            return batches
        rows = [
            {"client_side_key": client_key, "resource": resource, "count": count}
            for client_key, counts in self.counts.items()
            for resource, count in counts.items()
            if count
        ]
        self.counts.clear()
        return [(str(uuid.uuid4()), rows[i : i + MAX_ROWS]) for i in range(0, len(rows), MAX_ROWS)]

    async def flush(self, client: httpx.AsyncClient) -> bool:
        accepted = True
        for idempotency_key, rows in self.batches():
            try:
                response = await client.post(
                    self.url,
                    content=orjson.dumps(rows),
                    headers={"Idempotency-Key": idempotency_key, "Content-Type": "application/json"},
                )
            except httpx.HTTPError as exc:
                log.warning("usage report failed (%s): %d rows kept for the next flush", exc, len(rows))
                metrics.USAGE_ROWS.labels(outcome="retried").inc(len(rows))
                self.pending.append((idempotency_key, rows))
                accepted = False
                continue
            if 400 <= response.status_code < 500:
                log.warning("usage report rejected with %d: dropping %d rows", response.status_code, len(rows))
                metrics.USAGE_ROWS.labels(outcome="rejected").inc(len(rows))
                accepted = False
            elif not response.is_success:
                log.warning("usage report answered %d: %d rows kept", response.status_code, len(rows))
                metrics.USAGE_ROWS.labels(outcome="retried").inc(len(rows))
                self.pending.append((idempotency_key, rows))
                accepted = False
            else:
                metrics.USAGE_ROWS.labels(outcome="accepted").inc(len(rows))
        return accepted
