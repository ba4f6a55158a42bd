"""One home per idea, checked: the area's names in one module, a worker's Store complete when constructed."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.area import names
from proxy.area.publication import Area
from proxy.metrics import prometheus as metrics
from proxy.worker.factory import create_worker_app
from tests.inprocess import settings_for

PACKAGE = Path(__file__).parents[1] / "proxy"
# names distinctive enough that a literal elsewhere can only be a second definition of an area name
DISTINCT = {
    value
    for name, value in vars(names).items()
    if name.isupper()
    and not name.endswith("_SUFFIX")
    and isinstance(value, str)
    and ("." in value or "-" in value or "*" in value)
} | {names.PROCESSES, names.WEBHOOKS_SEEN}


def literals(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            start = node.values[0].value
            if isinstance(start, str) and start.startswith("env-"):
                yield node.lineno, "env-"


def test_area_names_are_defined_in_one_module() -> None:
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {value!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "area" / "names.py"
        for line, value in literals(path)
        if value in DISTINCT or value == "env-"
    ]
    assert found == [], "area names outside proxy/area/names.py"


@pytest.fixture
def area(tmp_path: Path) -> Iterator[Area]:
    created = Area(Path("/dev/shm") / f"edge-proxy-test.{os.getpid()}.{tmp_path.name}")
    created.create()
    yield created
    created.remove()


def test_a_worker_store_is_complete_when_built(area: Area) -> None:
    """The area is the Store's from its constructor (a webhook right after start is handed over, not a 503
    until the first publication is followed); the streams are ended through the routes, not the Store."""
    create_worker_app(settings_for(), area.path)
    (collector,) = metrics.scrape_collectors
    store = collector.store  # type: ignore[attr-defined]
    assert store.area == area.path
    assert not hasattr(store, "stop_streams") and not hasattr(store, "listeners")
