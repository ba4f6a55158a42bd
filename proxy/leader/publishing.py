"""What the next generation carries, and when it goes out.

The poller tells `Publication` which environments' entries changed (`changed`) and which are no longer served
(`removed`); a publication carries exactly those (`Publisher.publish_changes`), so its cost is proportional to
what changed, not to the number of environments. A changed document goes out within PUBLISH_SOON
(environments that change together share a generation; after a publication that took longer, after as long as
it took, so the loop never spends most of its time publishing); status-only changes (a 304, an error) are
batched for up to PUBLISH_STATUS_EVERY. A failed publication keeps what it carried for the next one and is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from proxy.area.control import AreaError
from proxy.area.publication import Publisher
from proxy.leader.environments import Environment
from proxy.metrics import prometheus as metrics

log = logging.getLogger("proxy.leader")

PUBLISH_SOON = 0.01  # seconds: environments that change together share one generation
PUBLISH_STATUS_EVERY = 0.5  # seconds: the most a status-only change (304, error) waits for publication
RETRY_AFTER = 1.0  # seconds after a failed publication


class Publication:
    def __init__(
        self,
        publisher: Publisher,
        environments: Mapping[str, Environment],
        meta: Callable[[], tuple[float | None, dict[str, Any]]],
    ) -> None:
        self.publisher = publisher
        self.environments = environments
        self.meta = meta  # (discovered_at, the rest of the manifest's meta) as of now
        self._changed: set[str] = set(environments)  # everything, at first: a new leader's first manifest
        self._removed: set[str] = set()
        self._wanted = asyncio.Event()
        self._soon = asyncio.Event()

    def changed(self, client_key: str | None = None, soon: bool = False) -> None:
        """`client_key`'s entry changed (None: only the meta); `soon`: a new document, publish at once."""
        if client_key is not None:
            self._changed.add(client_key)
            self._removed.discard(client_key)
        if soon:
            self._soon.set()
        self._wanted.set()

    def removed(self, client_key: str) -> None:
        self._removed.add(client_key)
        self._changed.discard(client_key)
        self._soon.set()
        self._wanted.set()

    async def run(self, stop: asyncio.Event) -> None:
        took = 0.0  # the last publication's seconds
        while not stop.is_set():
            await self._wanted.wait()
            # a changed document goes out at once; status-only changes wait to share a generation
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._soon.wait(), timeout=PUBLISH_STATUS_EVERY)
            # at least as long as the last publication took (one that wrote the full manifest of 10,000
            # environments takes a while): the loop spends at most about half its time publishing
            await asyncio.sleep(max(PUBLISH_SOON, took))
            self._wanted.clear()
            self._soon.clear()
            started = time.perf_counter()
            try:
                published = self.publish()
            except Exception:  # publish() reports area errors itself; anything else must not stop us either
                log.exception("publication failed unexpectedly")
                published = False
            took = time.perf_counter() - started
            if not published:  # retry: the workers must learn what changed
                await asyncio.sleep(RETRY_AFTER)
                self.changed(soon=True)

    def publish(self) -> bool:
        """One generation with what changed since the last."""
        keys, removed = self._changed, self._removed
        self._changed, self._removed = set(), set()
        envs = [env for key in keys if (env := self.environments.get(key)) is not None]
        documents = {env.client_key: env.document for env in envs if env.dirty and env.document is not None}
        answers = {key: answers for key in documents if (answers := self.environments[key].answers) is not None}
        entries = {env.client_key: env.manifest_entry() for env in envs}
        discovered_at, meta = self.meta()
        started = time.perf_counter()
        try:
            generation = self.publisher.publish_changes(documents, entries, removed, discovered_at, meta, answers)
        except AreaError as exc:
            self._changed |= keys
            self._removed |= removed - self._changed
            metrics.PUBLICATION_ERRORS.inc()
            log.error("publication failed, workers keep the previous generation: %s", exc)
            return False
        metrics.PUBLICATION_SECONDS.observe(time.perf_counter() - started)
        metrics.PUBLISHED_GENERATION.set(generation)
        for key in documents:
            env = self.environments[key]
            # published: its answers are read from the area from now on (10,000 environments: ~40 MB less)
            env.dirty, env.answers = False, None
        if documents:
            log.info("published generation %d (%d changed)", generation, len(documents))
        return True
