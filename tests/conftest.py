"""Shared fixtures: the fake upstream, and real `edge-proxy serve` processes (always stopped).

The helpers live in `tests/support.py`; import them from there. Tests live in tiers, one folder each, and
carry the tier's marker: `unit` (in-process, milliseconds: pieces and routes through raw ASGI calls,
tests/asgi.py), `differential` (in-process against an oracle: flag-engine, the SDK's mapper), `system` (real
processes, for what only processes show). `make check` runs all but `system`; `make test` runs everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_upstream import FakeFlagsmith
from tests.support import ProxyProcess, conformance_documents


@pytest.fixture
def upstream() -> Iterator[FakeFlagsmith]:
    fake = FakeFlagsmith(conformance_documents()).start()
    yield fake
    fake.stop()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(config: dict[str, Any], workers: int = 1, env: dict[str, str] | None = None) -> ProxyProcess:
        proxy = ProxyProcess(tmp_path / f"proxy{len(started)}", config, workers, env).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


TIERS = ("unit", "differential", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = item.path.parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
