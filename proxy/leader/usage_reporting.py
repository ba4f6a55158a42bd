"""Usage reporting (`proxy_key`): successful answers per environment and resource, to `{api_url}/proxy/usage/`.

Every `usage_flush_interval_seconds` the leader sums the workers' hand-overs and posts rows
`{client_side_key, resource, count}` in batches of at most 1,000, each with its own `Idempotency-Key`.
2xx: accepted. 4xx: dropped (logged), never retried. 5xx, timeouts, network errors: the batch is kept and
resent unchanged, under the same idempotency key, at the next flush; new counts wait for a later flush.

Batches are written to `<area>/usage/batches.json` before the workers' files are removed and rewritten as
each is settled, so a leader killed mid-flush (or stopped before upstream answered) loses nothing, and its
successor resends under the same keys (upstream drops what it already has).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson

from proxy.area.mailboxes import Inbox
from proxy.area.names import BATCHES, USAGE, temporary
from proxy.config.settings import Settings
from proxy.leader.upstream import flush_every, upstream_client
from proxy.metrics import prometheus as metrics

log = logging.getLogger("proxy.leader")

MAX_ROWS = 1000

Batch = tuple[str, list[dict[str, Any]]]  # (idempotency key, rows)


def load_batches(path: Path) -> list[Batch]:
    """The batches kept at `path` ([] when none, or unreadable: logged)."""
    try:
        data = orjson.loads(path.read_bytes())
        return [(str(key), list(rows)) for key, rows in data]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as exc:
        log.warning("dropping unreadable pending usage batches: %s", exc)
        return []


def save_batches(path: Path, batches: list[Batch]) -> None:
    if not batches:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    path.parent.mkdir(exist_ok=True)
    tmp = temporary(path)
    tmp.write_bytes(orjson.dumps(batches))
    os.rename(tmp, path)


def new_batches(counts: Mapping[str, Mapping[str, int]]) -> list[Batch]:
    """Hand-over counts as rows, in batches of at most MAX_ROWS, each with its own idempotency key."""
    rows = [
        {"client_side_key": client_key, "resource": resource, "count": count}
        for client_key, by_resource in counts.items()
        for resource, count in by_resource.items()
        if count
    ]
    return [(str(uuid.uuid4()), rows[i : i + MAX_ROWS]) for i in range(0, len(rows), MAX_ROWS)]


class UsageReporter:
    def __init__(self, settings: Settings, area: Path) -> None:
        assert settings.proxy_key is not None
        self.inbox = Inbox(area, USAGE)
        self.batches_path = area / USAGE / BATCHES
        self.url = settings.api_url + "/proxy/usage/"
        self.interval = settings.usage_flush_interval_seconds
        self.proxy_key = settings.proxy_key
        self.settings = settings

    async def run(self, stop: asyncio.Event) -> None:
        async with upstream_client(self.settings, {"X-Proxy-Key": self.proxy_key}) as client:
            await flush_every(self.interval, stop, lambda: self.flush(client), "usage")

    def _save(self, batches: list[Batch]) -> None:
        save_batches(self.batches_path, batches)

    def batches(self) -> list[Batch]:
        """What to send now: the pending batches unchanged, or else new ones from the hand-overs."""
        pending = load_batches(self.batches_path)
        if pending:
            return pending
        batches = new_batches(self.inbox.take())
        self._save(batches)  # safe on disk first, then the workers' files go
        self.inbox.settle({})
        return batches

    async def flush(self, client: httpx.AsyncClient) -> bool:
        batches = self.batches()
        kept: list[Batch] = []
        for index, (idempotency_key, rows) in enumerate(batches):
            try:
                response = await client.post(
                    self.url,
                    content=orjson.dumps(rows),
                    headers={"Idempotency-Key": idempotency_key, "Content-Type": "application/json"},
                )
            except httpx.HTTPError as exc:
                log.warning("usage report failed (%s): %d rows kept for the next flush", exc, len(rows))
                metrics.USAGE_ROWS.labels(outcome="retried").inc(len(rows))
                kept.append((idempotency_key, rows))
            else:
                if 400 <= response.status_code < 500:
                    log.warning("usage report rejected with %d: dropping %d rows", response.status_code, len(rows))
                    metrics.USAGE_ROWS.labels(outcome="rejected").inc(len(rows))
                elif not response.is_success:
                    log.warning("usage report answered %d: %d rows kept", response.status_code, len(rows))
                    metrics.USAGE_ROWS.labels(outcome="retried").inc(len(rows))
                    kept.append((idempotency_key, rows))
                else:
                    metrics.USAGE_ROWS.labels(outcome="accepted").inc(len(rows))
            self._save([*kept, *batches[index + 1 :]])  # what is not settled stays on disk
        self._save(kept)
        return not kept
