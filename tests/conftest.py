"""Shared fixtures: the fake upstream, and real `edge-proxy serve` processes (always stopped).

The helpers live in `tests/support.py`; import them from there.
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
