"""`POST /proxy/webhooks/flagsmith`: a Flagsmith environment webhook asks the leader to refresh now.

Flagsmith signs the raw body with HMAC-SHA256 (the webhook's secret as the key) and sends the hex digest
in `X-Flagsmith-Signature`. The body is `{"event_type": "FLAG_UPDATED", "data": {"new_state":
{"environment": {"id": 23, ...}, ...}, "previous_state": {...}, "timestamp": "<ISO 8601>", ...}}`; other
event types carry other shapes, so nothing in it is trusted beyond "refresh now" and, when it can be
found, which environment (by its numeric id): the document itself still comes from upstream.

A worker cannot talk upstream: it writes a refresh request file into the shared-memory area
(`<area>/refresh/<pid>-<n>.json`) that the leader picks up within REFRESH_POLL (proxy/leader/refresh.py).
Replays are refused across every worker with one marker file per signature, created with O_EXCL (only
one creation can succeed); the leader removes markers older than the replay window. With a shared Redis
(`redis_url` or `snapshot_redis_url`) the window is shared by the replicas too: a `SET NX` of the
signature's hash, expiring with the window, so a delivery one replica accepted is refused by the others.
When Redis does not answer, this replica's markers still refuse its own replays (logged, counted).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from blacksheep import Content, Request, Response

from proxy.area.names import REFRESH, WEBHOOKS_SEEN, handed_over, temporary
from proxy.config.sections import WebhookSettings
from proxy.http.errors import BadRequest, NotFound, ServiceUnavailable, Unauthorized
from proxy.metrics import prometheus as metrics

log = logging.getLogger("proxy.webhook")

SIGNATURE_HEADER = b"x-flagsmith-signature"


def sign(body: bytes, secret: str) -> str:
    """The signature Flagsmith sends for `body` (hex HMAC-SHA256, the secret UTF-8 encoded as the key)."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def environment_ids(payload: dict[str, Any]) -> list[int]:
    """The environment ids a webhook names (none: refresh every environment)."""
    data = payload.get("data")
    if not isinstance(data, dict):
        return []
    found: set[int] = set()
    candidates: list[Any] = [data.get("environment"), data.get("environment_id")]
    for state in (data.get("new_state"), data.get("previous_state")):
        if isinstance(state, dict):
            candidates.append(state.get("environment"))
    for candidate in candidates:
        if isinstance(candidate, dict):
            candidate = candidate.get("id")
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            found.add(candidate)
    return sorted(found)


def _timestamp(payload: dict[str, Any]) -> datetime | None:
    data = payload.get("data")
    value = data.get("timestamp") if isinstance(data, dict) else None
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"data.timestamp is not an ISO 8601 date: {value[:64]!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


SHARED_PREFIX = "edge-proxy:webhook-seen:"
REDIS_TIMEOUT = 2.0  # seconds: a hung Redis must not hold a webhook answer for long


class SharedReplays:
    """The replay window shared by the replicas through Redis (one key per delivery, expiring)."""

    def __init__(self, url: str, window_seconds: float) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        self.expire_ms = int(window_seconds * 2 * 1000)  # as long as the leader keeps local markers
        self._failing = False

    async def first_sighting(self, signature: bytes) -> bool | None:
        """True for a delivery no replica saw; False when one did; None when Redis did not answer."""
        key = SHARED_PREFIX + hashlib.sha256(signature).hexdigest()[:32]
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                first = bool(await self.client.set(key, b"1", nx=True, px=self.expire_ms))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            metrics.SHARED_REPLAY_ERRORS.inc()
            if not self._failing:
                log.warning("webhook replay window: redis did not answer, checking this replica only: %s", exc)
            self._failing = True
            return None
        self._failing = False
        return first


class WebhookReceiver:
    def __init__(self, settings: WebhookSettings, area: Path | None, shared_redis: str | None = None) -> None:
        self.settings = settings
        self.area = area
        self._sequence = 0
        self._shared_redis = shared_redis
        self._shared: SharedReplays | None = None  # connected at the first webhook

    async def _seen_elsewhere(self, signature: bytes) -> bool:
        if self._shared_redis is None:
            return False
        if self._shared is None:
            self._shared = SharedReplays(self._shared_redis, self.settings.replay_window_seconds)
        return await self._shared.first_sighting(signature) is False

    async def handle(self, request: Request, read_body: Callable[[Request], Awaitable[bytes]]) -> Response:
        secret = self.settings.secret
        if secret is None:
            raise NotFound("webhooks are off: set webhook.secret (the secret configured on the Flagsmith webhook)")
        body = await read_body(request)
        received = request.get_first_header(SIGNATURE_HEADER)
        if received is None:
            metrics.WEBHOOKS.labels(outcome="unsigned").inc()
            raise Unauthorized("missing X-Flagsmith-Signature header (set the webhook's secret in Flagsmith)")
        signature = received.strip().lower()
        if not hmac.compare_digest(sign(body, secret).encode(), signature):
            metrics.WEBHOOKS.labels(outcome="bad_signature").inc()
            raise Unauthorized("X-Flagsmith-Signature does not match the body (is webhook.secret the same secret?)")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            metrics.WEBHOOKS.labels(outcome="malformed").inc()
            raise BadRequest("webhook body is not JSON") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("event_type"), str):
            metrics.WEBHOOKS.labels(outcome="malformed").inc()
            raise BadRequest('webhook body must be a JSON object with an "event_type" string')
        sent_at = _timestamp(payload)
        window = self.settings.replay_window_seconds
        if sent_at is not None and abs(time.time() - sent_at.timestamp()) > window:
            metrics.WEBHOOKS.labels(outcome="replayed").inc()
            raise BadRequest(f"webhook data.timestamp is more than {window:g} s away (webhook.replay_window_seconds)")
        area = self.area
        if area is None:
            raise ServiceUnavailable("no shared-memory area to hand the refresh to (an in-process app)")
        if not self._first_sighting(area, signature) or await self._seen_elsewhere(signature):
            metrics.WEBHOOKS.labels(outcome="replayed").inc()
            raise BadRequest("webhook already received (replayed)")
        ids = environment_ids(payload)
        self._request_refresh(area, ids, payload["event_type"])
        metrics.WEBHOOKS.labels(outcome="accepted").inc()
        answer = {"status": "refresh_requested", "environment_ids": ids or "all"}
        return Response(202, None, Content(b"application/json", orjson.dumps(answer)))

    def _first_sighting(self, area: Path, signature: bytes) -> bool:
        folder = area / WEBHOOKS_SEEN
        folder.mkdir(exist_ok=True)
        try:
            fd = os.open(folder / signature[:64].decode("ascii", "replace"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def _request_refresh(self, area: Path, ids: list[int], event_type: str) -> None:
        folder = area / REFRESH
        folder.mkdir(exist_ok=True)
        self._sequence += 1
        path = folder / handed_over(os.getpid(), self._sequence)
        tmp = temporary(path)
        tmp.write_bytes(orjson.dumps({"environment_ids": ids, "event_type": event_type[:64], "at": time.time()}))
        os.rename(tmp, path)
        log.info("webhook %s: refresh requested for %s", event_type[:64], ids or "every environment")
