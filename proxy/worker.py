"""The application factory each Granian worker calls (`proxy.worker:create_app`).

Workers get the validated settings and the shared-memory area's path from environment variables set by
`edge-proxy serve`, so nothing depends on inheriting memory from the main process (Granian spawns
workers on Python 3.14).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import pickle
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from blacksheep import Application

from proxy import metrics
from proxy.app import build_app
from proxy.environment_metrics import EnvironmentCollector
from proxy.logs import configure_logging
from proxy.processes import WORKER, register
from proxy.realtime import end_streams_on_shutdown_signal
from proxy.settings import Settings
from proxy.shm import Subscriber
from proxy.store import Follower, Store

SETTINGS_ENV = "EDGE_PROXY_SETTINGS"
AREA_ENV = "EDGE_PROXY_AREA"

log = logging.getLogger("proxy.worker")


def encode_settings(settings: Settings) -> str:
    return base64.b64encode(pickle.dumps(settings)).decode()


def decode_settings(value: str) -> Settings:
    # Written by our own main process into our children's environment; never from outside.
    return pickle.loads(base64.b64decode(value))


def create_app() -> Application:
    # States are built in a thread; a shorter GIL switch interval (default 5 ms) lets the serving loop
    # in more often while a large document is being built.
    sys.setswitchinterval(0.001)
    settings = decode_settings(os.environ[SETTINGS_ENV])
    configure_logging(settings.logging)
    return create_worker_app(settings, Path(os.environ[AREA_ENV]))


def create_worker_app(settings: Settings, area: Path) -> Application:
    store = Store(settings)
    app = build_app(settings, store)
    metrics.scrape_collectors[:] = [EnvironmentCollector(store)]  # one worker, one store
    end_streams_on_shutdown_signal(store.stop_streams)

    @app.lifespan
    async def follow_publications() -> AsyncIterator[None]:
        register(area, WORKER)
        subscriber = Subscriber(area)
        follower = Follower(store, subscriber)
        follower.load_now()
        store.area = area
        task = asyncio.create_task(follower.run())
        log.debug("worker %d following %s at generation %d", os.getpid(), area, store.generation)
        try:
            yield
        finally:
            store.stop_streams()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.hand_over(area)  # what this worker counted since its last hand-over
            subscriber.close()

    return app
