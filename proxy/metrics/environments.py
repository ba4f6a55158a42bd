"""Per-environment series, computed when /metrics is scraped from the manifest the worker holds.

The leader's manifest already says, for each environment, when upstream last answered well, how big the
published document is and what the document calls itself. Reading it at scrape time (instead of setting
multiprocess gauges in the leader) means an environment removed by discovery, or renamed in Flagsmith,
leaves no stale series behind. Environments are labelled by the document's `id` and `name`, never by a
key; one whose document never loaded has neither yet and only shows in `edge_proxy_environments`.

`render` writes the exposition text directly: prometheus-client's objects and formatter took about 280 ms of
a worker's loop per scrape at 10,000 environments. `collect` builds the same families as prometheus-client
objects; a test holds `render()` equal to `generate_latest` over `collect()`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from proxy.area.manifest import ManifestEntry
from proxy.config.settings import Settings
from proxy.http.health import stale_after
from proxy.worker.keys import KeyIndex

LABELS = ["environment_id", "environment_name"]
# family → help text, in the order both `collect` and `render` write them
STATES = ("edge_proxy_environments", "Configured or discovered environments by state")
LAST_SUCCESS = (
    "edge_proxy_environment_last_success_timestamp_seconds",
    "When upstream last answered well (200 or 304) for the environment",
)
STALE = (
    "edge_proxy_environment_stale",
    "1 when the environment's last good answer is older than edge_proxy_environment_stale_after_seconds",
)
SIZE = ("edge_proxy_environment_document_bytes", "Size of the published environment document")
UPDATED = (
    "edge_proxy_environment_document_updated_timestamp_seconds",
    "The published document's updated_at (when it last changed in Flagsmith)",
)
STALE_AFTER = (
    "edge_proxy_environment_stale_after_seconds",
    "Seconds without a good answer after which an environment is stale (poll + grace × environments)",
)


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
        self._lines: dict[str, _Lines] = {}  # client key → its lines at the last scrape

    def _loaded(self) -> tuple[dict[str, int], list[tuple[str, ManifestEntry, bool]], float | None]:
        """(counts by state, (client key, entry, stale?) per loaded environment with an id, the threshold)."""
        store = self.store
        now = time.time()
        client_keys = store.keys.client_keys
        threshold = stale_after(store.settings, len(client_keys))
        counts = {"fresh": 0, "stale": 0, "not_loaded": 0}
        loaded = []
        for client_key in client_keys:
            entry = store.entries.get(client_key)
            success = entry.last_success if entry is not None else None
            if entry is None or success is None or entry.location is None:
                counts["not_loaded"] += 1
                continue
            is_stale = threshold is not None and now - success > threshold
            counts["stale" if is_stale else "fresh"] += 1
            if entry.environment_id is not None:
                loaded.append((client_key, entry, is_stale))
        return counts, loaded, threshold

    def collect(self) -> Iterator[Metric]:
        counts, loaded, threshold = self._loaded()
        states = GaugeMetricFamily(*STATES, labels=["state"])
        last_success = GaugeMetricFamily(*LAST_SUCCESS, labels=LABELS)
        stale = GaugeMetricFamily(*STALE, labels=LABELS)
        size = GaugeMetricFamily(*SIZE, labels=LABELS)
        updated = GaugeMetricFamily(*UPDATED, labels=LABELS)
        for _, entry, is_stale in loaded:
            labels = [str(entry.environment_id), entry.name or ""]
            last_success.add_metric(labels, float(entry.last_success or 0))
            stale.add_metric(labels, 1.0 if is_stale else 0.0)
            size.add_metric(labels, float(entry.location.length if entry.location else 0))
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
            yield GaugeMetricFamily(*STALE_AFTER, value=threshold)

    def render(self) -> bytes:
        """The text `generate_latest` writes for `collect()`, written directly (what /metrics sends). An
        environment's lines are formatted again only when its manifest entry changed since the last scrape."""
        counts, loaded, threshold = self._loaded()
        previous, kept = self._lines, {}
        successes, stale, sizes, updated = [], [], [], []
        for client_key, entry, is_stale in loaded:
            lines = previous.get(client_key)
            if lines is None or lines.entry is not entry:
                lines = _Lines.of(entry)
            kept[client_key] = lines
            successes.append(lines.last_success)
            stale.append(lines.stale_prefix + ("1.0\n" if is_stale else "0.0\n"))
            sizes.append(lines.size)
            if lines.updated:
                updated.append(lines.updated)
        self._lines = kept  # environments gone since are dropped with it
        out = _header(STATES)
        out += [f'{STATES[0]}{{state="{state}"}} {_value(count)}\n' for state, count in counts.items()]
        out += [*_header(LAST_SUCCESS), *successes, *_header(STALE), *stale]
        out += [*_header(SIZE), *sizes, *_header(UPDATED), *updated]
        if threshold is not None:
            out += [*_header(STALE_AFTER), f"{STALE_AFTER[0]} {_value(threshold)}\n"]
        return "".join(out).encode()


@dataclass(frozen=True, slots=True)
class _Lines:
    """One environment's series as text, kept while its manifest entry is the same object."""

    entry: ManifestEntry
    last_success: str
    stale_prefix: str  # the stale line up to its value (stale or not is decided at each scrape)
    size: str
    updated: str  # "" when the document has no readable updated_at

    @classmethod
    def of(cls, entry: ManifestEntry) -> _Lines:
        labels = (
            f'{{environment_id="{_escape(str(entry.environment_id))}",environment_name="{_escape(entry.name or "")}"}} '
        )
        updated_at = _timestamp(entry.updated_at)
        return cls(
            entry,
            f"{LAST_SUCCESS[0]}{labels}{_value(float(entry.last_success or 0))}\n",
            f"{STALE[0]}{labels}",
            f"{SIZE[0]}{labels}{_value(float(entry.location.length if entry.location else 0))}\n",
            f"{UPDATED[0]}{labels}{_value(updated_at)}\n" if updated_at is not None else "",
        )


def _value(number: float | None) -> str:
    """A sample's value as the text format writes it (Go's float formatting)."""
    return str(floatToGoString(number))  # type: ignore[no-untyped-call]  # untyped in prometheus-client


def _header(family: tuple[str, str]) -> list[str]:
    name, documentation = family
    return [f"# HELP {name} {documentation}\n", f"# TYPE {name} gauge\n"]


def _escape(value: str) -> str:
    """A label value as the text format escapes it (backslash, newline, double quote)."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value
