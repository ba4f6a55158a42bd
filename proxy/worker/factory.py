"""The application factory each Granian worker calls (`proxy.worker.factory:create_app`).

Workers get the shared-memory area's path from an environment variable set by `edge-proxy serve`, and the
validated settings from the area's private settings file (`proxy/area/settings_file.py`), so nothing depends on
inheriting memory from the main process (Granian spawns workers on Python 3.14).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from proxy.area.processes import WORKER, register
from proxy.area.publication import Subscriber
from proxy.area.settings_file import read_settings
from proxy.config.logs import configure_logging
from proxy.config.settings import Settings
from proxy.http.app import build_worker
from proxy.http.stream import end_streams_on_shutdown_signal
from proxy.metrics import prometheus as metrics
from proxy.metrics import tracing
from proxy.metrics.environments import EnvironmentCollector
from proxy.worker.store import Follower, Store

AREA_ENV = "EDGE_PROXY_AREA"

log = logging.getLogger("proxy.worker")


def create_app() -> Any:
    # States are built in a thread; a shorter GIL switch interval (default 5 ms) lets the serving loop
    # in more often while a large document is being built.
    sys.setswitchinterval(0.001)
    area = Path(os.environ[AREA_ENV])
    settings = read_settings(area)
    configure_logging(settings.logging)
    return create_worker_app(settings, area)


def create_worker_app(settings: Settings, area: Path) -> Any:
    """The ASGI application: the fast path in front of BlackSheep (proxy/http/app.py `build_worker`)."""
    store = Store(settings, area)
    served, app, end_streams = build_worker(settings, store)
    metrics.scrape_collectors[:] = [EnvironmentCollector(store)]  # one worker, one store
    end_streams_on_shutdown_signal(end_streams)

    @app.lifespan  # type: ignore[untyped-decorator]  # BlackSheep's lifespan decorator is untyped
    async def follow_publications() -> AsyncIterator[None]:
        register(area, WORKER)
        subscriber = Subscriber(area)
        follower = Follower(store, subscriber)
        follower.load_now()
        task = asyncio.create_task(follower.run())
        log.debug("worker %d following %s at generation %d", os.getpid(), area, store.generation)
        try:
            yield
        finally:
            end_streams()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.counters.hand_over(area)  # what this worker counted since its last hand-over
            subscriber.close()
            tracing.shutdown()  # export the spans still buffered

    return served
