"""The leader process: the only one that talks to upstream. Started with `spawn` by the main process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from proxy.area.names import METRICS
from proxy.area.processes import LEADER, WORKER, reap, register
from proxy.area.publication import Publisher
from proxy.area.settings_file import read_settings
from proxy.config.logs import configure_logging
from proxy.config.masking import mask_urls_in
from proxy.config.settings import Settings
from proxy.leader.analytics_forwarding import AnalyticsForwarder
from proxy.leader.discovery import Discovery
from proxy.leader.fanout import Fanout
from proxy.leader.poller import Poller
from proxy.leader.refresh import UpstreamStreams, WebhookRefreshes
from proxy.leader.snapshots import Snapshots, make_store
from proxy.leader.sources import make_source
from proxy.leader.usage_reporting import UsageReporter
from proxy.metrics import prometheus as metrics
from proxy.metrics import tracing

log = logging.getLogger("proxy.leader")

HEARTBEAT_EVERY = 0.5  # seconds; the supervisor replaces a leader silent for leader_heartbeat_timeout_seconds
REAP_INTERVAL = 1.0  # seconds between checks for dead workers (their live gauges go, a restart is counted)


def final_flush_seconds(settings: Settings) -> float:
    return settings.api_poll_timeout_seconds + 1


def drain_seconds(settings: Settings) -> float:
    """How long the supervisor waits for a stopping leader before killing it."""
    return final_flush_seconds(settings) + 3


async def _stop_when_orphaned(parent: int, stop: asyncio.Event) -> None:
    # If the main process is SIGKILLed nobody stops us: exit rather than poll upstream forever.
    while not stop.is_set():
        if os.getppid() != parent:
            log.error("the main process (pid %d) is gone; leader exiting", parent)
            stop.set()
        await asyncio.sleep(0.5)


async def _beat(publisher: Publisher, stop: asyncio.Event) -> None:
    # From the event loop itself: a blocked loop stops beating, which is what the supervisor must see.
    while not stop.is_set():
        publisher.beat()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=HEARTBEAT_EVERY)


async def _reap_dead_processes(area: Path, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            for role in reap(area, area / METRICS):
                if role == WORKER:
                    metrics.WORKER_RESTARTS.inc()
        except Exception:  # tidying metrics must never stop the leader
            log.exception("checking for dead processes failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=REAP_INTERVAL)


def run_leader(area: str) -> None:
    # Ctrl-C reaches the whole process group: the main process shuts us down with SIGTERM instead,
    # otherwise the watchdog would see us die and restart us during shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = read_settings(Path(area))
    configure_logging(settings.logging)
    try:
        import uvloop

        uvloop.run(_main(settings, Path(area)))
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is ignored
        pass


async def _main(settings: Settings, area: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    publisher = Publisher(area, settings.shared_memory_max_bytes)
    # The first beat comes after resuming (many environments take a while): the supervisor allows a new leader
    # leader_heartbeat_timeout_seconds + LEADER_FIRST_BEAT_GRACE for it.
    source = make_source(settings, tracing.start("leader"))
    discovery = Discovery(settings) if settings.proxy_key else None
    try:
        store = make_store(settings, report=False)  # the main process's preload reported on it
    except Exception as exc:  # e.g. the directory cannot be created: serve without snapshots, say why
        log.error("snapshot store unavailable, serving without snapshots: %s", mask_urls_in(str(exc)))
        store = None
    poller = Poller(settings, source, publisher, discovery, Snapshots(store) if store is not None else None)
    poller.resume()
    register(area, LEADER)
    log.info("leader started, polling %d environment(s)", len(poller.environments))
    orphan_watch = asyncio.create_task(_stop_when_orphaned(os.getppid(), stop))
    heartbeat = asyncio.create_task(_beat(publisher, stop))
    reaper = asyncio.create_task(_reap_dead_processes(area, stop))
    analytics = asyncio.create_task(AnalyticsForwarder(settings, area, poller.server_key_of).run(stop))
    usage = asyncio.create_task(UsageReporter(settings, area).run(stop)) if settings.proxy_key else None
    on_demand = []  # refreshes triggered by webhooks, an upstream proxy's stream, other replicas
    fanout = Fanout(settings, poller, settings.shared_redis) if settings.shared_redis else None
    if fanout is not None:
        on_demand.append(asyncio.create_task(fanout.run(stop)))
    if settings.webhook.secret:
        webhooks = WebhookRefreshes(settings, area, poller)
        if fanout is not None:
            webhooks.on_request = fanout.webhook
        on_demand.append(asyncio.create_task(webhooks.run(stop)))
    if settings.upstream_stream_url:
        on_demand.append(asyncio.create_task(UpstreamStreams(settings, poller).run(stop)))
    try:
        await poller.run(stop)
    finally:
        orphan_watch.cancel()
        heartbeat.cancel()
        reaper.cancel()
        stop.set()
        for task in on_demand:
            task.cancel()
        await asyncio.gather(*on_demand, return_exceptions=True)
        # Last flushes (workers handed their counts over as they stopped), together, within one deadline
        # that the supervisor's kill timeout (`drain_seconds`) leaves room for.
        flushes = [task for task in (analytics, usage) if task is not None]
        _, pending = await asyncio.wait(flushes, timeout=final_flush_seconds(settings))
        for task in pending:
            log.warning("final flush cut off after %.1fs; its counts are lost", final_flush_seconds(settings))
            task.cancel()
        await source.aclose()
        if discovery is not None:
            await discovery.aclose()
        publisher.close()
        if poller.snapshots is not None:
            poller.snapshots.close()
        tracing.shutdown()
        log.info("leader stopped")
