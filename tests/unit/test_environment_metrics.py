"""Per-environment series: what /metrics sends (`EnvironmentCollector.render`, written directly) equals what
prometheus-client's own formatter writes for the same families (`collect`), whatever the names hold."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.area.manifest import Location, ManifestEntry
from proxy.config.settings import Settings
from proxy.metrics.environments import EnvironmentCollector
from proxy.worker.keys import KeyIndex
from tests.inprocess import settings_for


@dataclass
class FakeStore:
    settings: Settings
    keys: KeyIndex
    entries: dict[str, ManifestEntry]


NAMES = ["plain", 'with "quotes"', "back\\slash", "two\nlines", "ünïcödé ✓", "", "trailing \\"]


def store(grace: float | None, count: int = 40) -> FakeStore:
    now = time.time()
    entries: dict[str, ManifestEntry] = {}
    keys: dict[str, dict[str, float | None]] = {}
    for i in range(count):
        client_key = f"client_{i}"
        keys[client_key] = {f"ser.server_{i}": None}
        if i % 10 == 9:
            continue  # configured, never answered: no entry at all
        location = None if i % 10 == 8 else Location(f"env-{i}", 1000 + i, 0)  # 8: nothing published yet
        entries[client_key] = ManifestEntry(
            name=NAMES[i % len(NAMES)] if i % 5 else None,
            environment_id=None if i % 10 == 7 else i,  # 7: a document without an id
            updated_at=[None, "2024-05-01T12:00:00+00:00", "not a date", "2024-05-01T12:00:00.123456Z"][i % 4],
            last_success=now - (100_000 if i % 3 == 0 else 1) + i / 7,  # every third one stale
            location=location,
        )
    health: dict[str, Any] = {"environment_update_grace_period_seconds": grace}
    return FakeStore(settings_for(health_check=health), KeyIndex(keys), entries)


@pytest.mark.parametrize("grace", [30.0, None], ids=["stale-after", "never-stale"])
def test_render_writes_what_prometheus_client_writes(grace: float | None) -> None:
    collector = EnvironmentCollector(store(grace))
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]  # it has collect(), which is all a registry calls
    rendered = collector.render()
    assert rendered == generate_latest(registry)
    families = {family.name: family for family in text_string_to_metric_families(rendered.decode())}
    assert {sample.labels["environment_name"] for sample in families["edge_proxy_environment_stale"].samples} >= {
        name for name in NAMES if name
    }  # every odd name reads back as written
    states = {sample.labels["state"]: sample.value for sample in families["edge_proxy_environments"].samples}
    assert states["not_loaded"] == 8 and states["fresh"] > 0 and (states["stale"] > 0) == (grace is not None)


def test_render_reformats_what_changed_and_forgets_what_is_gone() -> None:
    fake = store(30.0)
    collector = EnvironmentCollector(fake)
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    first = collector.render()
    renamed = fake.entries["client_1"]
    fake.entries["client_1"] = ManifestEntry(
        name='renamed "now"', environment_id=renamed.environment_id, last_success=1.0, location=renamed.location
    )  # a new entry object, as a swap makes: stale now, and another name
    del fake.entries["client_2"]  # no longer published
    fake.keys = KeyIndex({key: {} for key in list(fake.keys.client_keys) if key != "client_3"})  # gone
    second = collector.render()
    assert second != first and second == generate_latest(registry)
    assert b'environment_name="renamed \\"now\\""' in second and b'environment_id="3"' not in second
    assert "client_3" not in collector._lines
