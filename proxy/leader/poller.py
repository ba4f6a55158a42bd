"""The poll loops: each environment on its own schedule, the last good copy kept, changes published.

Independent of where it runs: it needs a Source (upstream) and a Publisher (shared memory); the in-process tests
give it a fake source or an httpx transport. Every environment has its own task, so one slow or failing
environment never delays another's refresh (nor discovery, which has its own task too); each fetch has a total
deadline (pages included). A failure of any kind (network, HTTP status, bad JSON, a document too large, one the
workers could not serve, a full shared-memory area) keeps the last good document, is logged, shows in the
manifest's status (health) and in metrics, and is retried with backoff and jitter, never less often than the
poll interval.

The parts: when to fetch (`proxy/leader/schedule.py`), the one way a document becomes an environment's
(`Environment.adopt`, `proxy/leader/environments.py`: from a fetch, a snapshot or a previous leader's
publication), and what the next generation carries (`proxy/leader/publishing.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from proxy.area.publication import Publisher
from proxy.config.masking import mask_key
from proxy.config.settings import Settings
from proxy.evaluation.environment import parse_updated_at
from proxy.leader.discovery import Discovery
from proxy.leader.environments import Candidate, Environment, Unservable, prepare, prepare_off_loop
from proxy.leader.publishing import Publication
from proxy.leader.schedule import Schedule
from proxy.leader.snapshots import Snapshots
from proxy.leader.sources import Fetched, FetchFailed, FetchResult, NotModified, Source, Validator
from proxy.metrics import prometheus as metrics

log = logging.getLogger("proxy.leader")


class Poller:
    def __init__(
        self,
        settings: Settings,
        source: Source,
        publisher: Publisher,
        discovery: Discovery | None = None,
        snapshots: Snapshots | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.publisher = publisher
        self.discovery = discovery
        self.snapshots = snapshots
        self.interval = settings.api_poll_frequency_seconds
        self.deadline = settings.api_fetch_deadline_seconds
        self.environments = {
            pair.client_side_key: Environment(pair.client_side_key, {pair.server_side_key: None})
            for pair in settings.environment_key_pairs
        }
        self._static_keys = {key for env in self.environments.values() for key in (env.client_key, *env.server_keys)}
        self._limit = asyncio.Semaphore(settings.max_concurrent_fetches)
        self._source_name = "file" if settings.api_url.lower().startswith("file:") else "upstream"
        self.schedule = Schedule(self.interval)
        self.publication = Publication(publisher, self.environments, self._meta)
        self.discovered_at: float | None = None  # last successful proxy-config sync
        self._environments_changed = asyncio.Event()
        self.leader_restarts = 0
        self._started_at = time.time()
        # told when a fetch finds a new document (proxy/leader/fanout.py: the other replicas refresh too)
        self.on_new_document: Callable[[Environment], None] | None = None

    def resume(self) -> None:
        """Take over what a previous leader published, so nothing is refetched that can be reused."""
        manifest = self.publisher.resume()
        if manifest is None:
            return
        self.discovered_at = manifest.discovered_at
        meta = manifest.extra
        # a manifest from a leader (not the main process's snapshot preload): we are its restart
        self.leader_restarts = meta.get("leader_restarts", 0) + ("leader_started_at" in meta)
        if self.snapshots is not None:
            self.snapshots.adopt(meta.get("snapshots"))
        for client_key, entry in manifest.environments.items():
            env = self.environments.get(client_key)
            if env is None and self.discovery is not None and entry.server_keys:
                # a discovered environment: keep serving it until discovery says otherwise
                env = self.environments[client_key] = Environment(client_key, entry.server_keys, static=False)
            if env is None or env.server_key not in entry.server_keys:
                self.publication.removed(client_key)
                continue
            self.publication.changed(client_key)
            env.resume_from(entry)
            data = self.publisher.read_document(entry)
            if data is None:
                continue
            published = self.publisher.has_answers(client_key)
            try:  # published without answers (the main process's snapshot preload): encoded now, republished
                candidate = Candidate(data, orjson.loads(data), None) if published else prepare(data)
            except (Unservable, orjson.JSONDecodeError):
                continue
            env.adopt(candidate, published=published)
            if entry.source in ("upstream", "file"):  # the previous leader's fetch, not the preload's snapshot
                env.validator = Validator(env.updated_at, entry.upstream_etag)
        log.info("resumed at generation %d", self.publisher.generation)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep one task per environment (discovery adds and removes environments), plus the publication."""
        tasks: dict[str, tuple[Environment, asyncio.Task[None]]] = {}
        helpers = [asyncio.create_task(self.publication.run(stop))]
        if self.discovery is not None:
            helpers.append(asyncio.create_task(self._discovery_loop(stop)))
        try:
            while not stop.is_set():
                for client_key, env in self.environments.items():
                    running = tasks.get(client_key)
                    if running is None or running[0] is not env or running[1].done():
                        if running is not None:
                            running[1].cancel()
                        tasks[client_key] = (env, asyncio.create_task(self._environment_loop(env, stop)))
                for client_key in [key for key in tasks if key not in self.environments]:
                    tasks.pop(client_key)[1].cancel()
                    self.schedule.forget(client_key)
                self._environments_changed.clear()
                # woken by a change of environments or by the stop (not a second later: shutdown waits on it)
                waits = [asyncio.ensure_future(self._environments_changed.wait()), asyncio.ensure_future(stop.wait())]
                try:
                    await asyncio.wait(waits, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits:
                        waiting.cancel()
        finally:
            for _, task in tasks.values():
                task.cancel()
            for task in helpers:
                task.cancel()
            await asyncio.gather(*(task for _, task in tasks.values()), *helpers, return_exceptions=True)

    async def _environment_loop(self, env: Environment, stop: asyncio.Event) -> None:
        if env.document is None and self.snapshots is not None:
            await self._restore(env)
        while not stop.is_set():
            if env.next_due > time.monotonic():
                await self.schedule.wait(env)
                continue
            self.schedule.fetching(env)
            try:
                await self._refresh(env)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one environment's loop die
                log.exception("environment %s: refresh failed unexpectedly", mask_key(env.client_key))
                env.next_due = time.monotonic() + self.interval
            self.schedule.fetched(env)
            self.publication.changed(env.client_key, soon=env.dirty)
            if env.unsaved and self.snapshots is not None:
                env.unsaved = not await self.snapshots.save(
                    env.client_key, list(env.server_keys), env.document or b"", env.updated_at
                )
                self.publication.changed()  # the store's status, for /proxy/status

    async def _restore(self, env: Environment) -> None:
        """Before upstream answers: serve the persisted snapshot, if there is a good one."""
        assert self.snapshots is not None
        snapshot = await self.snapshots.restore(env.client_key, env.server_keys)
        if snapshot is None or env.document is not None:
            return
        try:
            candidate = await prepare_off_loop(snapshot.document)
        except Unservable as exc:  # authentic bytes that are not a document a worker can serve
            self.snapshots.reject(env.client_key, f"not a document: {exc}", "not_document")
            return
        if env.document is not None:  # upstream answered meanwhile
            return
        env.adopt(candidate)
        env.source = "snapshot"
        env.snapshot_saved_at = snapshot.saved_at
        env.validator = None  # the first fetch is unconditional: upstream sends the whole document
        log.info(
            "environment %s: serving the snapshot saved %.0fs ago until upstream answers",
            mask_key(env.client_key),
            time.time() - snapshot.saved_at,
        )
        self.publication.changed(env.client_key, soon=True)

    def refresh_now(self, client_key: str, min_interval: float, trigger: str) -> bool:
        """Fetch `client_key` as soon as its rate limit allows (`Schedule.refresh_now`). False for an
        environment we do not poll."""
        env = self.environments.get(client_key)
        if env is None:
            return False
        self.schedule.refresh_now(env, min_interval, trigger)
        return True

    async def _discovery_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.discover()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad answer must never take the leader down
                metrics.UPSTREAM_FETCHES.labels(outcome="proxy_config_error").inc()
                log.exception("proxy config: sync failed unexpectedly; keeping the current environments")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)

    def server_key_of(self, client_key: str) -> str | None:
        env = self.environments.get(client_key)
        return env.server_key if env is not None else None

    async def discover(self) -> None:
        """Reconcile the discovered environments (static ones are never touched)."""
        assert self.discovery is not None
        desired = await self.discovery.fetch(time.time())
        if desired is None:
            metrics.UPSTREAM_FETCHES.labels(outcome="proxy_config_error").inc()
            return
        first = self.discovered_at is None
        self.discovered_at = time.time()
        self.publication.changed(soon=first)  # readiness waits for the first sync
        changed = removed = 0
        for client_key, server_keys in desired.items():
            if client_key in self._static_keys or self._static_keys.intersection(server_keys):
                continue
            env = self.environments.get(client_key)
            if env is None:
                self.environments[client_key] = Environment(client_key, server_keys, static=False)
            elif env.server_keys != server_keys:
                env.server_keys = server_keys  # rotation: dropped keys stop resolving at once
            else:
                continue
            self.publication.changed(client_key, soon=True)
            changed += 1
        for client_key, env in list(self.environments.items()):
            if not env.static and client_key not in desired:
                del self.environments[client_key]
                self.publication.removed(client_key)
                log.info("environment removed from proxy config: %s", mask_key(client_key))
                removed += 1
        if changed or removed:
            self._environments_changed.set()
            log.info("proxy config applied: %d changed, %d removed", changed, removed)

    async def _refresh(self, env: Environment) -> None:
        candidate: Candidate | None = None
        async with self._limit:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.deadline):
                    result: FetchResult = await self.source.fetch(
                        env.server_key, env.validator if env.document else None
                    )
                if isinstance(result, Fetched):
                    data = orjson.dumps(result.document)
                    if data != env.document:  # the answers are encoded exactly as a worker would read them
                        candidate = await prepare_off_loop(data, result.document)
            except TimeoutError:
                result = FetchFailed(
                    f"fetch not complete within {self.deadline:g} s (api_fetch_deadline_seconds)", "timeout"
                )
            except Unservable as exc:  # nothing is published that a worker cannot serve
                result = FetchFailed(f"document cannot be served: {exc}", "invalid_document")
            except Exception as exc:  # a bug in a source must not kill the loop
                log.exception("fetching %s failed unexpectedly", mask_key(env.server_key))
                result = FetchFailed(f"unexpected error: {type(exc).__name__}", "unexpected")
            metrics.UPSTREAM_FETCH_SECONDS.observe(time.perf_counter() - started)
        now = time.monotonic()
        if isinstance(result, FetchFailed):
            self._failed(env, result, now)
            return
        if env.failures:
            log.info("environment %s: upstream recovered", mask_key(env.client_key))
        env.failures = 0
        env.last_error = env.error_kind = None
        env.last_success = time.time()
        env.source = self._source_name
        env.snapshot_saved_at = None
        env.enter("valid")
        self.schedule.succeeded(env, now)
        if isinstance(result, NotModified):
            env.last_304 = env.last_success
            metrics.UPSTREAM_FETCHES.labels(outcome="not_modified").inc()
            return
        metrics.UPSTREAM_FETCHES.labels(outcome="ok").inc()
        env.last_200 = env.last_success
        assert isinstance(result, Fetched)
        env.validator = Validator(parse_updated_at(result.document.get("updated_at")), result.etag)
        if candidate is not None:
            # a change replaces a document; the first one a leader fetches is news to nobody else
            changed = env.document is not None
            env.adopt(candidate)
            env.unsaved = True
            log.info("environment %s: new document (%d bytes)", mask_key(env.client_key), len(candidate.data))
            if changed and self.on_new_document is not None:
                self.on_new_document(env)

    def _failed(self, env: Environment, result: FetchFailed, now: float) -> None:
        env.failures += 1
        env.last_error = result.reason
        env.error_kind = result.kind
        env.enter("interrupted" if env.document else "initializing")
        self.schedule.failed(env, now)
        metrics.UPSTREAM_FETCHES.labels(outcome="error").inc()
        metrics.UPSTREAM_FETCH_ERRORS.labels(reason=result.kind).inc()
        log.warning(
            "environment %s: %s (keeping the last good document; retry in %.1fs)",
            mask_key(env.client_key),
            result.reason,
            env.next_due - now,
        )

    def _meta(self) -> tuple[float | None, dict[str, Any]]:
        return self.discovered_at, {
            "leader_restarts": self.leader_restarts,
            "leader_started_at": self._started_at,
            "snapshots": self.snapshots.report() if self.snapshots is not None else None,
        }
