"""Changes reach every replica at once: replicas that share a Redis tell each other through pub/sub.

A replica learns of a change from a Flagsmith webhook, from an upstream proxy's stream, or from its own
fetch finding a new document. Without this, the other replicas (and the real-time streams of every client
connected to them) wait for their next poll. With `redis_url` (or `snapshot_redis_url`), the leader:

* publishes on `CHANNEL` when its fetch finds a new document (`document`: the environment's key hash, as
  file names have it, its id, `updated_at` and a digest of the document) and when a webhook reaches it
  (`webhook`: the environment ids it named). Messages never carry a key.
* subscribes to `CHANNEL`; for a message from another replica about an environment it serves, it asks the
  poller for an immediate fetch (`Poller.refresh_now`: the on-demand path, rate-limited per environment by
  `webhook.min_refresh_interval_seconds` and coalesced), unless it already holds that document or a
  newer one.

Never looping: a replica does not announce a document a peer already announced (the digest it was told),
so a refresh triggered by a peer's message that finds that document stays quiet; a message only ever
causes a fetch, and only a fetch that finds a new document causes a message.

Redis being down never stops anything: messages are dropped (polling is the safety net), the subscription
reconnects with backoff, and both are logged once per streak.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import secrets
import time
from typing import Any

import orjson

from proxy.area.names import key_hash
from proxy.config.masking import mask_key, mask_url
from proxy.config.settings import Settings
from proxy.leader.environments import Environment
from proxy.leader.poller import Poller
from proxy.leader.refresh import keys_for
from proxy.leader.snapshots import updated_at_us
from proxy.metrics import prometheus as metrics

log = logging.getLogger("proxy.leader")

CHANNEL = "edge-proxy:changes"
VERSION = 1
REDIS_TIMEOUT = 2.0  # seconds for a connection or a publish: a hung Redis must not hold messages for long
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
QUEUE_MAX = 1000  # messages waiting for Redis; past it they are dropped (polling catches up)


def digest(document: bytes) -> str:
    return hashlib.sha256(document).hexdigest()[:16]


class Fanout:
    def __init__(self, settings: Settings, poller: Poller, url: str) -> None:
        import redis.asyncio

        self.settings = settings
        self.poller = poller
        self.location = mask_url(url)
        self.client = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=REDIS_TIMEOUT, socket_keepalive=True, health_check_interval=30
        )
        self.node = secrets.token_hex(8)  # this leader: its own messages come back and are ignored
        self.interval = settings.webhook.min_refresh_interval_seconds
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_MAX)
        self.peer_digests: dict[str, str] = {}  # client key → digest of the document a peer announced last
        # client key → when a peer's webhook message made us refresh it: the replica the webhook reached
        # announces what it found, so what our refresh finds stays quiet (else the two race to announce)
        self.peer_webhooks: dict[str, float] = {}
        self._digests: dict[str, tuple[bytes, str]] = {}  # client key → (document, its digest)
        self._by_hash: dict[str, str] = {}  # key hash → client key
        poller.on_new_document = self.document_changed

    # -- telling the others ------------------------------------------------------------------------------
    def document_changed(self, env: Environment) -> None:
        """The poller found a new document for `env`: announce it, unless a peer announced it to us."""
        if env.document is None:
            return
        found = self._digest(env.client_key, env.document)
        told_at = self.peer_webhooks.pop(env.client_key, None)  # one fetch answers one peer's webhook
        if self.peer_digests.get(env.client_key) == found:
            return  # we fetched it because a peer told us: the others were told too
        if told_at is not None and time.monotonic() - told_at < self.settings.api_fetch_deadline_seconds:
            return  # a peer's webhook made us fetch it: every replica was told to fetch too
        self._send(
            {
                "kind": "document",
                "environment": key_hash(env.client_key),
                "environment_id": env.environment_id,
                "updated_at_us": updated_at_us(env.updated_at),
                "digest": found,
            }
        )

    def webhook(self, ids: list[int]) -> None:
        """A webhook reached this replica (its workers handed it over): the others refresh too."""
        self._send({"kind": "webhook", "environment_ids": ids})

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.outbox.put_nowait(orjson.dumps({"v": VERSION, "from": self.node, **message}))
        except asyncio.QueueFull:
            metrics.FANOUT_MESSAGES.labels(direction="sent", outcome="dropped").inc()

    async def _publish(self, stop: asyncio.Event) -> None:
        failing = False
        while not stop.is_set():
            message = await self.outbox.get()
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    await self.client.publish(CHANNEL, message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis errors, timeouts: polling is the safety net
                metrics.FANOUT_MESSAGES.labels(direction="sent", outcome="dropped").inc()
                if not failing:
                    log.warning("redis %s: change not announced to other replicas: %s", self.location, exc)
                failing = True
                continue
            if failing:
                log.info("redis %s: announcing changes again", self.location)
            failing = False
            metrics.FANOUT_MESSAGES.labels(direction="sent", outcome="ok").inc()

    # -- hearing from the others -------------------------------------------------------------------------
    async def _subscribe(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                if failures:
                    log.info("redis %s: listening to other replicas again", self.location)
                failures = 0
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self.receive(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "redis %s: not hearing other replicas' changes (%s); polling meanwhile, reconnecting",
                    self.location,
                    exc,
                )
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
            delay = min(RETRY_MAX, RETRY_FIRST * 2 ** max(0, failures - 1)) * random.uniform(0.8, 1.2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay if failures else 0)

    def receive(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict) or message.get("v") != VERSION:
            metrics.FANOUT_MESSAGES.labels(direction="received", outcome="ignored").inc()
            return
        if message.get("from") == self.node:
            return
        kind = message.get("kind")
        if kind == "document":
            refreshed = self._peer_document(message)
        elif kind == "webhook":
            ids = message.get("environment_ids")
            wanted = [i for i in ids if isinstance(i, int)] if isinstance(ids, list) else []
            refreshed = False
            for client_key in keys_for(self.poller, wanted):
                self.peer_webhooks[client_key] = time.monotonic()
                refreshed = self.poller.refresh_now(client_key, self.interval, "peer") or refreshed
        else:
            refreshed = False
        metrics.FANOUT_MESSAGES.labels(direction="received", outcome="refresh" if refreshed else "ignored").inc()

    def _peer_document(self, message: dict[str, Any]) -> bool:
        client_key = self._client_key(message.get("environment"))
        env = self.poller.environments.get(client_key) if client_key is not None else None
        announced = message.get("digest")
        if env is None or client_key is None or not isinstance(announced, str):
            return False  # not an environment we serve
        self.peer_digests[client_key] = announced
        if env.document is not None:
            if self._digest(client_key, env.document) == announced:
                return False  # we have it
            theirs = message.get("updated_at_us")
            if isinstance(theirs, int) and env.updated_at is not None and updated_at_us(env.updated_at) >= theirs:
                return False  # ours is as new (the peer's poll was behind)
        log.info("environment %s: a replica announced a new document; refreshing", mask_key(client_key))
        return self.poller.refresh_now(client_key, self.interval, "peer")

    def _client_key(self, hashed: Any) -> str | None:
        if not isinstance(hashed, str):
            return None
        found = self._by_hash.get(hashed)
        if found is None or found not in self.poller.environments:
            # discovery may have added environments since: index them again
            self._by_hash = {key_hash(key): key for key in self.poller.environments}
            found = self._by_hash.get(hashed)
        return found

    def _digest(self, client_key: str, document: bytes) -> str:
        cached = self._digests.get(client_key)
        if cached is not None and cached[0] is document:
            return cached[1]
        found = digest(document)
        self._digests[client_key] = (document, found)
        return found

    async def run(self, stop: asyncio.Event) -> None:
        log.info("announcing and following changes through redis %s (channel %s)", self.location, CHANNEL)
        tasks = [asyncio.create_task(self._publish(stop)), asyncio.create_task(self._subscribe(stop))]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.client.aclose()
