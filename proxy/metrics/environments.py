"""Per-environment series, computed when /metrics is scraped from the manifest the worker holds.

The leader's manifest already says, for each environment, when upstream last answered well, how big the
published document is and what the document calls itself. Reading it at scrape time (instead of setting
multiprocess gauges in the leader) means an environment removed by discovery, or renamed in Flagsmith,
leaves no stale series behind. Environments are labelled by the document's `id` and `name`, never by a
key; one whose document never loaded has neither yet and only shows in `edge_proxy_environments`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

from proxy.area.manifest import ManifestEntry
from proxy.config.settings import Settings
from proxy.http.health import stale_after
from proxy.worker.keys import KeyIndex

LABELS = ["environment_id", "environment_name"]


class Environments(Protocol):
    """What a worker's Store offers (see proxy.worker.store)."""

    settings: Settings
    keys: KeyIndex
    entries: dict[str, ManifestEntry]


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


class EnvironmentCollector:
    def __init__(self, store: Environments) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store = self.store
        now = time.time()
        client_keys = store.keys.client_keys
        threshold = stale_after(store.settings, len(client_keys))
        states = GaugeMetricFamily(
            "edge_proxy_environments", "Configured or discovered environments by state", labels=["state"]
        )
        last_success = GaugeMetricFamily(
            "edge_proxy_environment_last_success_timestamp_seconds",
            "When upstream last answered well (200 or 304) for the environment",
            labels=LABELS,
        )
        stale = GaugeMetricFamily(
            "edge_proxy_environment_stale",
            "1 when the environment's last good answer is older than edge_proxy_environment_stale_after_seconds",
            labels=LABELS,
        )
        size = GaugeMetricFamily(
            "edge_proxy_environment_document_bytes", "Size of the published environment document", labels=LABELS
        )
        updated = GaugeMetricFamily(
            "edge_proxy_environment_document_updated_timestamp_seconds",
            "The published document's updated_at (when it last changed in Flagsmith)",
            labels=LABELS,
        )
        counts = {"fresh": 0, "stale": 0, "not_loaded": 0}
        for client_key in client_keys:
            entry = store.entries.get(client_key)
            success = entry.last_success if entry is not None else None
            if entry is None or success is None or entry.location is None:
                counts["not_loaded"] += 1
                continue
            is_stale = threshold is not None and now - success > threshold
            counts["stale" if is_stale else "fresh"] += 1
            if entry.environment_id is None:
                continue
            labels = [str(entry.environment_id), entry.name or ""]
            last_success.add_metric(labels, float(success))
            stale.add_metric(labels, 1.0 if is_stale else 0.0)
            size.add_metric(labels, float(entry.location.length))
            updated_at = _timestamp(entry.updated_at)
            if updated_at is not None:
                updated.add_metric(labels, updated_at)
        for state, count in counts.items():
            states.add_metric([state], float(count))
        yield states
        yield last_success
        yield stale
        yield size
        yield updated
        if threshold is not None:
            yield GaugeMetricFamily(
                "edge_proxy_environment_stale_after_seconds",
                "Seconds without a good answer after which an environment is stale (poll + grace × environments)",
                value=threshold,
            )
