"""The poll loops: each environment on its own schedule, the last good copy kept, changes published.

Independent of where it runs: it needs a Source (upstream) and a Publisher (shared memory). Every
environment has its own task, so one slow or failing environment never delays another's refresh (nor
discovery, which has its own task too); each fetch has a total deadline (pages included). A failure of any
kind (network, HTTP status, bad JSON, a document too large, one the workers could not build, a full
shared-memory area) keeps the last good document, is logged, shows in the manifest's status (health) and
in metrics, and is retried with backoff and jitter, never less often than the poll interval.

Publication is its own task: a changed document is published within PUBLISH_SOON (or, when the last
publication took longer, after as long as it took: the loop spends at most about half its time writing
manifests); status-only changes (a 304, an error) are batched for up to PUBLISH_STATUS_EVERY, so thousands
of environments do not write thousands of manifests a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from proxy.area.control import AreaError
from proxy.area.manifest import ManifestEntry
from proxy.area.publication import Publisher
from proxy.config.settings import Settings, mask_key
from proxy.evaluation.environment import answers_for, parse_updated_at
from proxy.leader.discovery import Discovery
from proxy.leader.snapshots import Snapshots
from proxy.leader.sources import Fetched, FetchFailed, NotModified, Source, Validator
from proxy.metrics import prometheus as metrics

log = logging.getLogger("proxy.leader")

BACKOFF_FIRST = 0.5
PUBLISH_SOON = 0.01  # seconds: environments that change together share one generation
PUBLISH_STATUS_EVERY = 0.5  # seconds: the most a status-only change (304, error) waits for publication


@dataclass(slots=True)
class Environment:
    client_key: str
    server_keys: dict[str, float | None]  # server key → expiry (epoch seconds) or None
    static: bool = True  # from environment_key_pairs: never removed by discovery
    document: bytes | None = None
    answers: bytes | None = None  # the document's answers file, published with it (None: resumed, published)
    updated_at: datetime | None = None
    name: str | None = None
    environment_id: int | None = None  # the document's `id`: with `name`, how metrics label the environment
    last_success: float | None = None  # wall-clock seconds of the last good answer (200 or 304)
    last_error: str | None = None
    error_kind: str | None = None  # a short category of last_error, safe to show without details
    failures: int = 0
    next_due: float = 0.0
    dirty: bool = False  # fetched, not yet published
    # for /proxy/status and health: where the document came from, and the state in LaunchDarkly's terms
    source: str | None = None  # "upstream", "file" or "snapshot"
    state: str = "initializing"  # "valid" (last fetch good), "interrupted" (failing, serving), "initializing"
    state_since: float = field(default_factory=time.time)
    last_200: float | None = None
    last_304: float | None = None
    snapshot_saved_at: float | None = None  # when the snapshot served (source "snapshot") was written
    unsaved: bool = False  # a new document not yet written to the snapshot store
    # for conditional fetches: set only from the source's own answers, never from a snapshot (a restored
    # document is fetched in full, so a stored date can never make upstream confirm a stored document)
    validator: Validator | None = None

    @property
    def server_key(self) -> str:
        """The key used to fetch the document: the first one (discovered keys are sorted)."""
        return next(iter(self.server_keys))

    def manifest_entry(self) -> ManifestEntry:
        """Its status for the manifest; the publisher adds where the document is."""
        return ManifestEntry(
            server_keys=self.server_keys,
            name=self.name,
            environment_id=self.environment_id,
            updated_at=self.updated_at.isoformat() if self.updated_at else None,
            last_success=self.last_success,
            last_error=self.last_error,
            error_kind=self.error_kind,
            source=self.source,
            state=self.state,
            state_since=self.state_since,
            last_200=self.last_200,
            last_304=self.last_304,
            snapshot_saved_at=self.snapshot_saved_at,
            upstream_etag=self.validator.etag if self.validator is not None else None,
        )

    def enter(self, state: str) -> None:
        if state != self.state:
            self.state, self.state_since = state, time.time()


class Poller:
    def __init__(
        self, settings: Settings, source: Source, publisher: Publisher, discovery: Discovery | None = None
    ) -> None:
        self.settings = settings
        self.source = source
        self.publisher = publisher
        self.interval = settings.api_poll_frequency_seconds
        self.environments = {
            pair.client_side_key: Environment(pair.client_side_key, {pair.server_side_key: None})
            for pair in settings.environment_key_pairs
        }
        self._static_keys = {key for env in self.environments.values() for key in (env.client_key, *env.server_keys)}
        self._limit = asyncio.Semaphore(settings.max_concurrent_fetches)
        self.deadline = settings.api_fetch_deadline_seconds
        self.discovery = discovery
        self.discovered_at: float | None = None  # last successful proxy-config sync
        # what the next publication carries: environments whose entry changed, and those no longer served
        self._changed: set[str] = set(self.environments)
        self._removed: set[str] = set()
        self._environments_changed = asyncio.Event()
        self._publish_wanted = asyncio.Event()
        self._publish_soon = asyncio.Event()
        self.snapshots: Snapshots | None = None  # set by the leader when a snapshot store is configured
        self.leader_restarts = 0
        self.resumed_meta: dict[str, Any] = {}
        self._started_at = time.time()
        # on-demand refreshes (webhooks, an upstream proxy's stream): client key → wake-up, requested due time
        self._wakes: dict[str, asyncio.Event] = {}
        self._requested: dict[str, float] = {}
        self._last_requested: dict[str, float] = {}
        # told when a fetch finds a new document (proxy/leader/fanout.py: the other replicas refresh too)
        self.on_new_document: Callable[[Environment], None] | None = None

    def resume(self) -> None:
        """Take over what a previous leader published, so nothing is refetched that can be reused."""
        manifest = self.publisher.resume()
        if manifest is None:
            return
        self.discovered_at = manifest.discovered_at
        self.resumed_meta = manifest.extra
        # a manifest from a leader (not the main process's snapshot preload): we are its restart
        self.leader_restarts = self.resumed_meta.get("leader_restarts", 0) + ("leader_started_at" in self.resumed_meta)
        self._removed = set(manifest.environments)  # those still served are taken back below
        for client_key, entry in manifest.environments.items():
            env = self.environments.get(client_key)
            server_keys = entry.server_keys
            if env is None and self.discovery is not None and server_keys:
                # a discovered environment: keep serving it until discovery says otherwise
                env = self.environments[client_key] = Environment(client_key, server_keys, static=False)
            if env is None or env.server_key not in server_keys:
                continue
            self._removed.discard(client_key)
            self._changed.add(client_key)
            env.last_success = entry.last_success
            env.last_error = entry.last_error
            env.error_kind = entry.error_kind
            for name in ("source", "state", "state_since", "last_200", "last_304", "snapshot_saved_at"):
                if getattr(entry, name) is not None:
                    setattr(env, name, getattr(entry, name))
            data = self.publisher.read_document(entry)
            if data is None:
                continue
            if not self.publisher.has_answers(client_key):  # published without (the main process's preload)
                try:
                    env.answers = answers_for(data)
                except Exception:
                    continue
                env.dirty = True
            document = orjson.loads(data)
            env.document = data
            env.updated_at = parse_updated_at(document.get("updated_at"))
            env.name = document.get("name")
            env.environment_id = document.get("id")
            if entry.source in ("upstream", "file"):  # the previous leader's fetch, not the preload's snapshot
                env.validator = Validator(env.updated_at, entry.upstream_etag)
        log.info("resumed at generation %d", self.publisher.generation)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep one task per environment (discovery adds and removes environments), plus the publisher."""
        tasks: dict[str, tuple[Environment, asyncio.Task[None]]] = {}
        helpers = [asyncio.create_task(self._publish_loop(stop))]
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
                self._environments_changed.clear()
                # woken by a change of environments or by the stop (not a second later: shutdown waits on it)
                waits = [asyncio.ensure_future(self._environments_changed.wait()), asyncio.ensure_future(stop.wait())]
                try:
                    await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
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
            delay = env.next_due - time.monotonic()
            if delay > 0:
                await self._sleep(env, stop, delay)
                continue
            self._requested.pop(env.client_key, None)  # this fetch answers every request made so far
            try:
                await self._refresh(env)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one environment's loop die
                log.exception("environment %s: refresh failed unexpectedly", mask_key(env.client_key))
                env.next_due = time.monotonic() + self.interval
            requested = self._requested.get(env.client_key)
            if requested is not None:  # asked for while the fetch was under way: it may predate the change
                env.next_due = min(env.next_due, requested)
            self._want_publish(soon=env.dirty, client_key=env.client_key)
            if env.unsaved and self.snapshots is not None:
                env.unsaved = not await self.snapshots.save(
                    env.client_key, list(env.server_keys), env.document or b"", env.updated_at
                )
                self._want_publish(soon=False)  # the store's status, for /proxy/status

    async def _restore(self, env: Environment) -> None:
        """Before upstream answers: serve the persisted snapshot, if there is a good one."""
        assert self.snapshots is not None
        snapshot = await self.snapshots.restore(env.client_key, env.server_keys)
        if snapshot is None or env.document is not None:
            return
        try:
            document = orjson.loads(snapshot.document)
            updated_at = parse_updated_at(document.get("updated_at"))
            answers = await asyncio.to_thread(answers_for, snapshot.document)
        except Exception as exc:  # authentic bytes that are not a document a worker can serve
            self.snapshots.reject(env.client_key, f"not a document: {exc}", "not_document")
            return
        if env.document is not None:  # upstream answered meanwhile
            return
        env.document = snapshot.document
        env.answers = answers
        env.updated_at = updated_at
        env.name = document.get("name")
        env.environment_id = document.get("id")
        env.source = "snapshot"
        env.snapshot_saved_at = snapshot.saved_at
        env.validator = None  # the first fetch is unconditional: upstream sends the whole document
        env.dirty = True
        log.info(
            "environment %s: serving the snapshot saved %.0fs ago until upstream answers",
            mask_key(env.client_key),
            time.time() - snapshot.saved_at,
        )
        self._want_publish(soon=True, client_key=env.client_key)

    async def _sleep(self, env: Environment, stop: asyncio.Event, delay: float) -> None:
        """Until `delay` passes, `stop` is set, or `refresh_now` wakes this environment."""
        wake = self._wakes.setdefault(env.client_key, asyncio.Event())
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        wake.clear()

    def refresh_now(self, client_key: str, min_interval: float, trigger: str) -> bool:
        """Fetch `client_key` as soon as its rate limit allows (at most one requested fetch per
        `min_interval`; requests in between are coalesced). False for an environment we do not poll."""
        env = self.environments.get(client_key)
        if env is None:
            return False
        now = time.monotonic()
        due = max(now, self._last_requested.get(client_key, -min_interval) + min_interval)
        metrics.REFRESH_REQUESTS.labels(trigger=trigger).inc()
        if client_key in self._requested and self._requested[client_key] <= due:
            return True  # already asked for: coalesced
        self._last_requested[client_key] = due
        self._requested[client_key] = due
        if due < env.next_due:
            env.next_due = due
            self._wakes.setdefault(client_key, asyncio.Event()).set()
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

    def _want_publish(self, soon: bool, client_key: str | None = None) -> None:
        """Publish soon (a new document) or with the next batch (status only); `client_key`: its entry changed."""
        if client_key is not None:
            self._changed.add(client_key)
        if soon:
            self._publish_soon.set()
        self._publish_wanted.set()

    async def _publish_loop(self, stop: asyncio.Event) -> None:
        took = 0.0  # the last publication's seconds
        while not stop.is_set():
            await self._publish_wanted.wait()
            # a changed document goes out at once; status-only changes wait to share a generation
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish_soon.wait(), timeout=PUBLISH_STATUS_EVERY)
            # At least as long as the last publication took: its manifest lists every environment (~0.4 s for
            # 10,000), and publishing back to back left the fetches 10 ms a round (10,000 took 15 minutes).
            await asyncio.sleep(max(PUBLISH_SOON, took))
            self._publish_wanted.clear()
            self._publish_soon.clear()
            started = time.perf_counter()
            try:
                published = self.publish()
            except Exception:  # publish() reports area errors itself; anything else must not stop us either
                log.exception("publication failed unexpectedly")
                published = False
            took = time.perf_counter() - started
            if not published:  # retry: the workers must learn what changed
                await asyncio.sleep(1.0)
                self._want_publish(soon=True)

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
        if self.discovered_at is None:
            self._want_publish(soon=True)  # readiness waits for the first sync
        self.discovered_at = time.time()
        changed = removed = 0
        for client_key, server_keys in desired.items():
            if client_key in self._static_keys or self._static_keys.intersection(server_keys):
                continue
            env = self.environments.get(client_key)
            if env is None:
                self.environments[client_key] = Environment(client_key, server_keys, static=False)
                self._changed.add(client_key)
                self._removed.discard(client_key)
                changed += 1
            elif env.server_keys != server_keys:
                env.server_keys = server_keys  # rotation: dropped keys stop resolving at once
                self._changed.add(client_key)
                changed += 1
        for client_key, env in list(self.environments.items()):
            if not env.static and client_key not in desired:
                del self.environments[client_key]
                self._removed.add(client_key)
                self._changed.discard(client_key)
                log.info("environment removed from proxy config: %s", mask_key(client_key))
                removed += 1
        if changed or removed:
            self._environments_changed.set()
            self._want_publish(soon=True)
            log.info("proxy config applied: %d changed, %d removed", changed, removed)

    async def _refresh(self, env: Environment) -> None:
        async with self._limit:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.deadline):
                    result = await self.source.fetch(env.server_key, env.validator if env.document else None)
                answers = None
                if isinstance(result, Fetched):
                    result, answers = await self._check_builds(env, result)
            except TimeoutError:
                result = FetchFailed(
                    f"fetch not complete within {self.deadline:g} s (api_fetch_deadline_seconds)", "timeout"
                )
            except Exception as exc:  # a bug in a source must not kill the loop
                log.exception("fetching %s failed unexpectedly", mask_key(env.server_key))
                result = FetchFailed(f"unexpected error: {type(exc).__name__}", "unexpected")
            metrics.UPSTREAM_FETCH_SECONDS.observe(time.perf_counter() - started)
        now = time.monotonic()
        if isinstance(result, FetchFailed):
            env.failures += 1
            env.last_error = result.reason
            env.error_kind = result.kind
            env.enter("interrupted" if env.document else "initializing")
            backoff = min(self.interval, BACKOFF_FIRST * 2 ** (env.failures - 1))
            env.next_due = now + backoff * random.uniform(0.8, 1.2)
            metrics.UPSTREAM_FETCHES.labels(outcome="error").inc()
            metrics.UPSTREAM_FETCH_ERRORS.labels(reason=result.kind).inc()
            log.warning(
                "environment %s: %s (keeping the last good document; retry in %.1fs)",
                mask_key(env.client_key),
                result.reason,
                env.next_due - now,
            )
            return
        if env.failures:
            log.info("environment %s: upstream recovered", mask_key(env.client_key))
        env.failures = 0
        env.last_error = env.error_kind = None
        env.last_success = time.time()
        env.source = "file" if self.settings.api_url.lower().startswith("file:") else "upstream"
        env.snapshot_saved_at = None
        env.enter("valid")
        env.next_due = now + self.interval
        if isinstance(result, NotModified):
            env.last_304 = env.last_success
            metrics.UPSTREAM_FETCHES.labels(outcome="not_modified").inc()
            return
        metrics.UPSTREAM_FETCHES.labels(outcome="ok").inc()
        env.last_200 = env.last_success
        data = orjson.dumps(result.document)
        env.validator = Validator(parse_updated_at(result.document.get("updated_at")), result.etag)
        if data != env.document:
            # a change replaces a document; the first one a leader fetches is news to nobody else
            changed = env.document is not None
            env.document, env.answers = data, answers
            env.dirty = env.unsaved = True
            env.updated_at = parse_updated_at(result.document.get("updated_at"))
            env.name = result.document.get("name")
            env.environment_id = result.document.get("id")
            log.info("environment %s: new document (%d bytes)", mask_key(env.client_key), len(data))
            if changed and self.on_new_document is not None:
                self.on_new_document(env)

    async def _check_builds(self, env: Environment, result: Fetched) -> tuple[Fetched | FetchFailed, bytes | None]:
        """Encode a new document's answers (evaluated exactly as a worker would): nothing is published that a
        worker cannot serve, and no worker encodes what the leader already did."""
        data = orjson.dumps(result.document)
        if data == env.document:
            return result, None
        try:
            answers = await asyncio.to_thread(answers_for, data)
        except Exception as exc:
            return FetchFailed(f"document cannot be served: {type(exc).__name__}: {exc}", "invalid_document"), None
        return result, answers

    def _meta(self) -> dict[str, Any]:
        return {
            "leader_restarts": self.leader_restarts,
            "leader_started_at": self._started_at,
            "snapshots": self.snapshots.status() if self.snapshots is not None else None,
        }

    def publish(self) -> bool:
        """One generation with what changed since the last: its work is proportional to that, not to the number
        of environments."""
        keys, removed = self._changed, self._removed
        self._changed, self._removed = set(), set()
        envs = [env for key in keys if (env := self.environments.get(key)) is not None]
        changed = {env.client_key: env.document for env in envs if env.dirty and env.document}
        answers = {key: answers for key in changed if (answers := self.environments[key].answers) is not None}
        entries = {env.client_key: env.manifest_entry() for env in envs}
        started = time.perf_counter()
        try:
            generation = self.publisher.publish_changes(
                changed, entries, removed, self.discovered_at, self._meta(), answers
            )
        except AreaError as exc:
            self._changed |= keys
            self._removed |= removed - self._changed
            metrics.PUBLICATION_ERRORS.inc()
            log.error("publication failed, workers keep the previous generation: %s", exc)
            return False
        metrics.PUBLICATION_SECONDS.observe(time.perf_counter() - started)
        metrics.PUBLISHED_GENERATION.set(generation)
        for key in changed:
            self.environments[key].dirty = False
        if changed:
            log.info("published generation %d (%d changed)", generation, len(changed))
        return True
