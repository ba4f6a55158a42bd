"""The leader's side of on-demand refreshes: webhook requests the workers hand over, and the upstream
proxy's stream (proxy-follows-proxy). Both only ask the poller to fetch an environment now; the poller
still makes the usual conditional fetch, rate-limited per environment (`Poller.refresh_now`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from proxy.area.names import HANDED_OVER_GLOB, REFRESH, WEBHOOKS_SEEN
from proxy.config.masking import mask_key, mask_urls_in
from proxy.config.settings import Settings
from proxy.leader.poller import Poller
from proxy.leader.upstream import upstream_client
from proxy.metrics import prometheus as metrics

log = logging.getLogger("proxy.leader")

REFRESH_POLL = 0.02  # seconds between looks at the refresh folder: webhook latency adds at most this
PRUNE_EVERY = 10.0  # seconds between removals of expired replay markers
STREAM_RETRY = 1.0  # seconds before reconnecting to the upstream proxy's stream (jittered)
STREAM_RETRY_MAX = 30.0  # the most a failing upstream stream waits between attempts


def keys_for(poller: Poller, ids: list[int]) -> list[str]:
    """The environments a webhook's ids name (none: every environment). An id we do not know (a document
    not loaded yet, or not ours) refreshes every environment: the safe answer."""
    wanted = set(ids)
    keys = [key for key, env in poller.environments.items() if not wanted or env.environment_id in wanted]
    return keys if keys or not wanted else list(poller.environments)


class WebhookRefreshes:
    """Reads `<area>/refresh/*.json` (written by workers' webhook handler) and asks for refreshes."""

    def __init__(self, settings: Settings, area: Path, poller: Poller) -> None:
        self.settings = settings
        self.folder = area / REFRESH
        self.seen = area / WEBHOOKS_SEEN
        self.poller = poller
        # told of every webhook request (proxy/leader/fanout.py: the other replicas refresh too)
        self.on_request: Callable[[list[int]], None] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        pruned_at = time.monotonic()
        while not stop.is_set():
            try:
                self.take()
                if time.monotonic() - pruned_at > PRUNE_EVERY:
                    pruned_at = time.monotonic()
                    self.prune()
            except Exception:  # never let a bad request file take the leader down
                log.exception("webhook refresh requests: unexpected error")
            # a plain sleep (the leader's stop cancels this task): wait_for made a task per look, 50 a second,
            # which with the folder's glob cost an idle leader 1.7 % of a core
            await asyncio.sleep(REFRESH_POLL)

    def take(self) -> None:
        try:
            names = os.listdir(self.folder)  # one system call: most looks find nothing
        except FileNotFoundError:
            return
        for name in sorted(name for name in names if fnmatch.fnmatch(name, HANDED_OVER_GLOB)):
            path = self.folder / name
            try:
                request: Any = orjson.loads(path.read_bytes())
                ids = (request.get("environment_ids") or []) if isinstance(request, dict) else []
            except (OSError, ValueError) as exc:
                log.warning("dropping an unreadable refresh request %s: %s", path.name, exc)
                ids = []
            with contextlib.suppress(OSError):
                path.unlink()
            self.request(ids)

    def request(self, ids: list[int]) -> None:
        interval = self.settings.webhook.min_refresh_interval_seconds
        for key in keys_for(self.poller, ids):
            self.poller.refresh_now(key, interval, "webhook")
        if self.on_request is not None:
            self.on_request(ids)

    def prune(self) -> None:
        if not self.seen.is_dir():
            return
        expired = time.time() - self.settings.webhook.replay_window_seconds * 2
        for marker in self.seen.iterdir():
            with contextlib.suppress(OSError):
                if marker.stat().st_mtime < expired:
                    marker.unlink()


class UpstreamStreams:
    """Proxy-follows-proxy: one stream per environment from the upstream edge proxy; an event newer than
    the document we hold triggers a refresh at once."""

    def __init__(self, settings: Settings, poller: Poller, transport: httpx.AsyncBaseTransport | None = None) -> None:
        assert settings.upstream_stream_url is not None
        self.base = settings.upstream_stream_url
        self.poller = poller
        # reads wait for at most three keep-alives of an upstream proxy with default settings
        self.client = upstream_client(settings, {"Accept": "text/event-stream"}, transport)
        self.timeout = httpx.Timeout(settings.api_poll_timeout_seconds, read=90.0)

    async def run(self, stop: asyncio.Event) -> None:
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while not stop.is_set():
                for key in self.poller.environments:
                    if key not in tasks or tasks[key].done():
                        tasks[key] = asyncio.create_task(self._follow(key, stop))
                for key in [key for key in tasks if key not in self.poller.environments]:
                    tasks.pop(key).cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await self.client.aclose()

    async def _follow(self, client_key: str, stop: asyncio.Event) -> None:
        url = f"{self.base}sse/environments/{client_key}/stream"
        failures = 0
        while not stop.is_set():
            problem: str | None = None
            try:
                async with self.client.stream("GET", url, timeout=self.timeout) as response:
                    if response.status_code != 200:
                        problem = f"answered {response.status_code}"
                    else:
                        failures = 0
                        async for line in response.aiter_lines():
                            if line.startswith("data:"):
                                self._event(client_key, line[5:])
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, OSError) as exc:
                problem = f"{type(exc).__name__}: {mask_urls_in(str(exc))}"
            if problem is not None:
                failures += 1
                # logged once per streak; polling goes on meanwhile, so nothing is lost but latency
                (log.warning if failures == 1 else log.debug)(
                    "upstream stream for %s: %s; polling meanwhile, reconnecting with backoff",
                    mask_key(client_key),
                    problem,
                )
            delay = min(STREAM_RETRY_MAX, STREAM_RETRY * 2 ** max(0, failures - 1))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay * random.uniform(0.8, 1.2))

    def _event(self, client_key: str, data: str) -> None:
        try:
            updated_at = orjson.loads(data).get("updated_at")
        except (ValueError, AttributeError):
            return
        env = self.poller.environments.get(client_key)
        if env is None or not isinstance(updated_at, int | float):
            return
        if env.updated_at is None or updated_at > env.updated_at.timestamp():
            metrics.UPSTREAM_STREAM_EVENTS.inc()
            self.poller.refresh_now(client_key, 0.0, "upstream_stream")
