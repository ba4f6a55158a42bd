"""A worker's view of the environments: current states and the leader's manifest entries
for them, swapped per generation.

The key index is `proxy/worker/keys.py`, the identity LRU `proxy/worker/response_cache.py` (its policy
`proxy/http/identities.py`), what the worker counts `proxy/worker/counters.py`; the Store holds one of each.

The request path only reads `Store.resolve` and the state it returns. `Follower` runs as a background
task per worker: it notices a new generation (one memory read), builds the changed environments' states
in a thread (so a large document does not stall the event loop for long) and swaps them in with one
assignment.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from proxy.area.answers import AnswersError
from proxy.area.bodies import KeyKind
from proxy.area.manifest import ManifestEntry
from proxy.area.subscriber import Published, Subscriber, Update
from proxy.config.masking import mask_key
from proxy.config.settings import Settings
from proxy.http.errors import ServiceUnavailable
from proxy.metrics import prometheus as metrics
from proxy.worker.counters import WorkerCounters
from proxy.worker.environment import EnvironmentState
from proxy.worker.evaluators import Evaluator, Evaluators
from proxy.worker.keys import KeyIndex, ServerKeys
from proxy.worker.response_cache import ResponseCache
from proxy.worker.served import Served

log = logging.getLogger("proxy.worker")

FOLLOW_INTERVAL = 0.05  # seconds between generation checks: propagation adds at most this


Evaluated = tuple[EnvironmentState, Evaluator]  # a new state and the evaluator built ahead for it
Listener = Callable[[dict[str, EnvironmentState], list[str]], None]


class Store:
    """One worker's environments. Built complete here; the one thing added later is who listens to swaps,
    through `on_swap` (the real-time streams, registered while the app is built)."""

    def __init__(self, settings: Settings, area: Path | None = None) -> None:
        self.settings = settings
        self.area = area  # the shared-memory area the worker follows (None in the in-process tier)
        # client key → {server key: expiry}; configured pairs, then whatever the leader discovered
        self.static: dict[str, ServerKeys] = {
            pair.client_side_key: {pair.server_side_key: None} for pair in settings.environment_key_pairs
        }
        self.keys = KeyIndex(self.static)
        self.states: dict[str, EnvironmentState] = {}
        self.entries: dict[str, ManifestEntry] = {}  # the leader's manifest entry per environment
        self.build_errors: dict[str, str] = {}
        cache = settings.identity_cache
        self.cache = ResponseCache(cache.cache_max_size, cache.cache_max_bytes) if cache.use_cache else None
        self.generation = 0
        self.meta: dict[str, Any] = {}
        self.discovered = False  # with a proxy_key: has the leader synced the proxy config yet?
        self.counters = WorkerCounters(self.cache, usage=bool(settings.proxy_key))
        self.evaluators = Evaluators(
            settings.identity_cache.compiled_environments, on_built=out_of_the_collectors_sight
        )
        self._listeners: list[Listener] = []

    def on_swap(self, listener: Listener) -> None:
        """Call `listener(rebuilt states, removed client keys)` after every swap that changed a state."""
        self._listeners.append(listener)

    def resolve(self, key: bytes | None) -> tuple[KeyKind, Served]:
        """The state a key's request is served from: 401 for an unknown key, 503 before its first document."""
        kind, client_key = self.keys.lookup(key)
        state = self.states.get(client_key)
        if state is None:
            raise ServiceUnavailable("environment document not loaded yet; try again shortly")
        return kind, state

    def environment_id_of(self, key: bytes | None) -> int | None:
        """The id of the environment a key names (None: unknown key, or not loaded): for traces."""
        found = self.keys.keys.get(key) if key else None
        state = self.states.get(found[1]) if found is not None else None
        return state.environment_id if state is not None else None

    def apply(
        self,
        update: Update,
        built: dict[str, EnvironmentState],
        evaluated: Sequence[Evaluated] = (),
    ) -> None:
        """Swap in new states and entries (on the event loop, no await: requests see old or new), in
        proportion to what changed; the evaluators built ahead for new states replace the old states' ones."""
        if update.full:  # a reader behind the journal (or new): everything anew
            self.entries = dict(update.entries)
            served: dict[str, ServerKeys] = {key: entry.server_keys for key, entry in self.entries.items()}
            served.update(self.static)
            self.keys = KeyIndex(served)
            gone = [key for key in self.states if key not in served]
        else:
            gone = []
            for client_key in update.removed:
                self.entries.pop(client_key, None)
                if client_key not in self.static:
                    self.keys.remove(client_key)
                    if client_key in self.states:
                        gone.append(client_key)
            for client_key, entry in update.entries.items():
                previous = self.entries.get(client_key)
                self.entries[client_key] = entry
                # discovery added, or rotated its keys (configured pairs keep theirs)
                if client_key not in self.static and (previous is None or previous.server_keys != entry.server_keys):
                    self.keys.set(client_key, entry.server_keys)
        if update.meta is not None:
            self.discovered = update.meta[0] is not None  # with a proxy_key: synced the proxy config once
            self.meta = update.meta[1]  # leader restarts, the snapshot backend's report (/proxy/status)
        if built or gone:
            self._swap(built, gone, evaluated)
        self.generation = update.generation

    def _swap(self, built: dict[str, EnvironmentState], gone: list[str], evaluated: Sequence[Evaluated]) -> None:
        for client_key in [*built, *gone]:
            replaced = self.states.get(client_key)
            if replaced is not None:
                self.evaluators.forget(replaced)
        for state, evaluator in evaluated:
            self.evaluators.keep(state, evaluator)
        for client_key in gone:
            del self.states[client_key]
        self.states.update(built)
        if self.cache is not None:
            for client_key in [*built, *gone]:
                self.cache.drop_environment(client_key)
        for listener in self._listeners:
            listener(built, gone)


def build_states(
    published: Mapping[str, Published],
    build_errors: dict[str, str],
    evaluators: Evaluators | None = None,
    wanted: Collection[str] = (),
) -> tuple[dict[str, EnvironmentState], list[tuple[EnvironmentState, Evaluator]]]:
    """States over the changed environments' published files (in a thread: a publication without answers
    has them encoded here), and evaluators built ahead for the `wanted` ones (those whose previous
    evaluator is kept). A failure keeps the previous state and is reported."""
    built: dict[str, EnvironmentState] = {}
    evaluated: list[tuple[EnvironmentState, Evaluator]] = []
    for client_key, files in published.items():
        started = time.perf_counter()
        try:
            state = _state(client_key, files, evaluators)
            if client_key in wanted:
                evaluated.append((state, Evaluator(client_key, state.document_bytes())))
        except Exception as exc:
            build_errors[client_key] = f"{type(exc).__name__}: {exc}"
            metrics.STATE_BUILD_ERRORS.inc()
            log.error(
                "environment %s: the published document failed to build, keeping the previous state: %s",
                mask_key(client_key),
                build_errors[client_key],
            )
            continue
        built[client_key] = state
        build_errors.pop(client_key, None)
        metrics.STATE_BUILD_SECONDS.observe(time.perf_counter() - started)
    return built, evaluated


def _state(client_key: str, files: Published, evaluators: Evaluators | None) -> EnvironmentState:
    if files.answers is not None:
        try:
            return EnvironmentState(client_key, files.document, files.answers, evaluators)
        except AnswersError as exc:  # a leader of another version: encode them here, as for none
            log.warning(
                "environment %s: published answers unreadable (%s); encoding them here", mask_key(client_key), exc
            )
        finally:
            files.answers.release_pages()
    return EnvironmentState.of_document(client_key, files.document.bytes(), evaluators)


def out_of_the_collectors_sight() -> None:
    """Move every object alive now, the states just swapped in included, out of the cyclic collector's sight.

    A full collection walks every tracked object: with a 1 MB document's state that is 60 ms, with the heavy
    profile and a full identity cache 70 ms (measured), a pause for every request in flight. States live
    until their environment changes and hold no reference cycles (a dropped state leaves no cyclic garbage:
    tests/unit/test_publication.py), so freezing them loses nothing: they are still freed by reference counting. The
    request path itself leaves almost nothing for the collector (3 young collections in 20,000 uncached
    identity requests, measured), so its thresholds stay Python's."""
    gc.freeze()


class Follower:
    def __init__(self, store: Store, subscriber: Subscriber) -> None:
        self.store = store
        self.subscriber = subscriber

    def load_now(self) -> None:
        """Synchronous first load, at worker start-up before serving."""
        update = self.subscriber.read() if self.subscriber.published else None
        if update is not None:
            built, _ = build_states(update.published, self.store.build_errors, self.store.evaluators)
            self.store.apply(update, built)
            out_of_the_collectors_sight()

    async def follow(self) -> None:
        """Read the new generation (mapping its changed files) and build its states in a thread, then swap on
        the loop; evaluators in use are rebuilt with their new documents, so the next identity request waits
        for none."""
        loop = asyncio.get_running_loop()
        update = await loop.run_in_executor(None, self.subscriber.read)
        if update is None:
            return
        store = self.store
        built: dict[str, EnvironmentState] = {}
        evaluated: list[tuple[EnvironmentState, Evaluator]] = []
        if update.published:
            wanted = [key for key in update.published if store.evaluators.wanted(key, store.states)]
            built, evaluated = await loop.run_in_executor(
                None, build_states, update.published, store.build_errors, store.evaluators, wanted
            )
        store.apply(update, built, evaluated)
        if built:
            out_of_the_collectors_sight()

    async def run(self) -> None:
        flushed_at = time.monotonic()
        while True:
            try:
                if self.subscriber.changed():
                    await self.follow()
                now = time.monotonic()
                if now - flushed_at >= 1.0:
                    self.store.counters.flush(self.subscriber.path, self.store.generation)
                    flushed_at = now
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the follower die: the worker would serve stale data forever
                log.exception("worker failed to load a publication; retrying")
                await asyncio.sleep(1.0)
            await asyncio.sleep(FOLLOW_INTERVAL)
