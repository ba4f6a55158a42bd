"""A worker's view of the environments: key index, current states, health status, response cache.

The request path only reads `Store.resolve` and the state it returns. `Follower` runs as a background
task per worker: it notices a new generation (one memory read), builds the changed environments' states
in a thread (so a large document does not stall the event loop for long) and swaps them in with one
assignment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy import metrics
from proxy.cache import ResponseCache
from proxy.environment import EnvironmentState, KeyKind
from proxy.errors import ServiceUnavailable, Unauthorized
from proxy.handover import CountsBuffer
from proxy.settings import Settings, mask_key
from proxy.shm import Subscriber

log = logging.getLogger("proxy.worker")

FOLLOW_INTERVAL = 0.05  # seconds between generation checks: propagation adds at most this


class Store:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # client key → {server key: expiry}; configured pairs, then whatever the leader discovered
        self.static: dict[str, dict[str, float | None]] = {
            pair.client_side_key: {pair.server_side_key: None} for pair in settings.environment_key_pairs
        }
        self._index(self.static)
        self.states: dict[str, EnvironmentState] = {}
        self.status: dict[str, dict[str, Any]] = {}  # the leader's per-environment status (manifest)
        self.build_errors: dict[str, str] = {}
        cache = settings.identity_cache
        self.cache = ResponseCache(cache.cache_max_size, cache.cache_max_bytes) if cache.use_cache else None
        self.generation = 0
        self.discovered = False  # with a proxy_key: has the leader synced the proxy config yet?
        self.analytics = CountsBuffer("analytics")
        self.usage = CountsBuffer("usage") if settings.proxy_key else None
        # called after a swap with (rebuilt states, removed client keys): the real-time streams
        self.listeners: list[Callable[[dict[str, EnvironmentState], list[str]], None]] = []
        self.area: Path | None = None  # the shared-memory area, once the worker follows it (webhook hand-over)
        self.stop_streams: Callable[[], None] = lambda: None  # set by build_app: ends the streams at shutdown

    def _index(self, environments: dict[str, dict[str, float | None]]) -> None:
        # every key → (kind, client key, expiry); bytes, as the header arrives
        keys: dict[bytes, tuple[KeyKind, str, float | None]] = {}
        for client_key, server_keys in environments.items():
            keys[client_key.encode()] = (KeyKind.CLIENT, client_key, None)
            for server_key, expires in server_keys.items():
                keys[server_key.encode()] = (KeyKind.SERVER, client_key, expires)
        self.keys = keys
        self.client_keys = list(environments)

    def client_key(self, key: bytes | None) -> tuple[KeyKind, str]:
        found = self.keys.get(key) if key else None
        # a discovered server key stops resolving when it expires, even between polls
        if found is None or (found[2] is not None and found[2] < time.time()):
            raise Unauthorized(f"unknown key '{(key or b'').decode('utf-8', 'replace')}'")
        return found[0], found[1]

    def resolve(self, key: bytes | None) -> tuple[KeyKind, EnvironmentState]:
        kind, client_key = self.client_key(key)
        state = self.states.get(client_key)
        if state is None:
            raise ServiceUnavailable("environment document not loaded yet; try again shortly")
        return kind, state

    def hand_over(self, area: Path) -> None:
        """Give the leader this worker's analytics and usage counts."""
        self.analytics.hand_over(area)
        if self.usage is not None:
            self.usage.hand_over(area)

    def flush_metrics(self) -> None:
        cache = self.cache
        metrics.flush(cache.hits if cache else 0, cache.misses if cache else 0)
        metrics.flush_worker(
            self.generation,
            len(cache) if cache else 0,
            cache.size_bytes if cache else 0,
            cache.evictions if cache else 0,
        )

    def apply(self, manifest: dict[str, Any], built: dict[str, EnvironmentState]) -> None:
        """Swap in new states and status (on the event loop, no await: requests see old or new)."""
        self.status = manifest["environments"]
        self.discovered = (manifest.get("meta") or {}).get("discovered_at") is not None
        served = {key: entry.get("server_keys") or {} for key, entry in self.status.items()}
        served.update(self.static)
        self._index(served)  # discovery may have added, removed or rotated keys
        gone = [key for key in self.states if key not in served]
        if built or gone:
            self.states = {**{k: v for k, v in self.states.items() if k in served}, **built}
            if self.cache is not None:
                for client_key in [*built, *gone]:
                    self.cache.drop_environment(client_key)
            for listener in self.listeners:
                listener(built, gone)
        self.generation = manifest["generation"]


def build_states(documents: dict[str, bytes], build_errors: dict[str, str]) -> dict[str, EnvironmentState]:
    """Build states for changed documents; a failure keeps the previous state and is reported."""
    built: dict[str, EnvironmentState] = {}
    for client_key, data in documents.items():
        started = time.perf_counter()
        try:
            built[client_key] = EnvironmentState(client_key, data)
        except Exception as exc:
            build_errors[client_key] = f"{type(exc).__name__}: {exc}"
            metrics.STATE_BUILD_ERRORS.inc()
            log.error(
                "environment %s: the published document failed to build, keeping the previous state: %s",
                mask_key(client_key),
                build_errors[client_key],
            )
            continue
        build_errors.pop(client_key, None)
        metrics.STATE_BUILD_SECONDS.observe(time.perf_counter() - started)
    return built


class Follower:
    def __init__(self, store: Store, subscriber: Subscriber) -> None:
        self.store = store
        self.subscriber = subscriber

    def load_now(self) -> None:
        """Synchronous first load, at worker start-up before serving."""
        polled = self.subscriber.poll() if self.subscriber.published else None
        if polled is not None:
            manifest, documents = polled
            built = build_states(documents, self.store.build_errors)
            self.store.apply(manifest, built)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        flushed_at = time.monotonic()
        while True:
            try:
                if self.subscriber.changed():
                    polled = self.subscriber.poll()
                    if polled is not None:
                        manifest, documents = polled
                        built = {}
                        if documents:
                            built = await loop.run_in_executor(None, build_states, documents, self.store.build_errors)
                        self.store.apply(manifest, built)
                now = time.monotonic()
                if now - flushed_at >= 1.0:
                    self.store.flush_metrics()
                    self.store.hand_over(self.subscriber.path)
                    flushed_at = now
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the follower die: the worker would serve stale data forever
                log.exception("worker failed to load a publication; retrying")
                await asyncio.sleep(1.0)
            await asyncio.sleep(FOLLOW_INTERVAL)
