"""When each environment is fetched next: the poll interval, spread and jittered; backoff after failures; and
refreshes asked for on demand (webhooks, an upstream proxy's stream), rate-limited and coalesced.

Spread: at start every environment is due at once (the first documents are wanted as soon as possible), so
the first good answer schedules the next fetch anywhere in [0.5, 1.5) intervals, and every later one an
interval ± JITTER. The fetches of 10,000 environments, and of a fleet of replicas, are then spread evenly
over the interval instead of coming in the burst they started with, and stay spread.

A waiting environment holds no task of its own while it waits: it sleeps on its own wake-up event with a
timer handle (a task per wait, as `asyncio.wait_for` makes, costs memory and work times 10,000).
"""

from __future__ import annotations

import asyncio
import random
import time

from proxy.leader.environments import Environment
from proxy.metrics import prometheus as metrics

BACKOFF_FIRST = 0.5  # seconds before the first retry after a failure, doubling up to the interval
JITTER = 0.1  # a later fetch comes an interval ± this share of it after the last
FIRST_SPREAD = (0.5, 1.5)  # the first good answer's next fetch, in intervals


class Schedule:
    def __init__(self, interval: float, rng: random.Random | None = None) -> None:
        self.interval = interval
        self._random = rng or random.Random()
        self._wakes: dict[str, asyncio.Event] = {}
        self._requested: dict[str, float] = {}  # client key → when a requested fetch is due
        self._last_requested: dict[str, float] = {}

    def succeeded(self, env: Environment, now: float) -> None:
        low, high = FIRST_SPREAD if env.fetched == 0 else (1 - JITTER, 1 + JITTER)
        env.fetched += 1
        env.next_due = now + self.interval * self._random.uniform(low, high)

    def failed(self, env: Environment, now: float) -> None:
        """Backoff with jitter, never longer than the interval."""
        backoff = min(self.interval, BACKOFF_FIRST * 2 ** (env.failures - 1))
        env.next_due = now + backoff * self._random.uniform(0.8, 1.2)

    def fetching(self, env: Environment) -> None:
        """A fetch starts: it answers every request made so far."""
        self._requested.pop(env.client_key, None)

    def fetched(self, env: Environment) -> None:
        """A fetch ended: a request made while it was under way may predate the change, so it still stands."""
        requested = self._requested.get(env.client_key)
        if requested is not None:
            env.next_due = min(env.next_due, requested)

    async def wait(self, env: Environment) -> None:
        """Until the environment is due, or `refresh_now` moves it closer (then the caller checks again)."""
        delay = env.next_due - time.monotonic()
        if delay <= 0:
            return
        wake = self._wakes.get(env.client_key)
        if wake is None:
            wake = self._wakes[env.client_key] = asyncio.Event()
        handle = asyncio.get_running_loop().call_later(delay, wake.set)
        try:
            await wake.wait()
        finally:
            handle.cancel()
            wake.clear()

    def refresh_now(self, env: Environment, min_interval: float, trigger: str) -> None:
        """Fetch `env` as soon as its rate limit allows (at most one requested fetch per `min_interval`;
        requests in between are coalesced)."""
        client_key = env.client_key
        now = time.monotonic()
        due = max(now, self._last_requested.get(client_key, -min_interval) + min_interval)
        metrics.REFRESH_REQUESTS.labels(trigger=trigger).inc()
        if client_key in self._requested and self._requested[client_key] <= due:
            return  # already asked for: coalesced
        self._last_requested[client_key] = due
        self._requested[client_key] = due
        if due < env.next_due:
            env.next_due = due
            wake = self._wakes.get(client_key)
            if wake is not None:
                wake.set()

    def forget(self, client_key: str) -> None:
        """The environment is no longer polled."""
        for table in (self._wakes, self._requested, self._last_requested):
            table.pop(client_key, None)
