"""`edge-proxy serve`: the main process. Embeds Granian, owns the shared-memory area, supervises the leader.

Start-up order: the area is created (cleaning up a SIGKILLed predecessor's) and the validated settings are
written into it (0600; the leader and the workers read them there), Granian's `on_startup` hook
spawns the leader (a `spawn`-context process) and its watchdog thread, then Granian starts the workers,
which attach to the area by path. Shutdown: Granian drains and stops the workers, `on_shutdown` stops the
leader, counts not yet forwarded upstream are kept in `snapshot_dir` or the snapshot Redis (`pending_counts.py`),
and the area is removed.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.area import buckets
from proxy.area.control import Area, AreaError, Heartbeat
from proxy.area.settings_file import write_settings
from proxy.config.granian import GranianOptions
from proxy.config.logs import logging_config
from proxy.config.settings import Settings, secret_variables
from proxy.http.status import WORKERS_ENV
from proxy.leader.process import drain_seconds, run_leader
from proxy.leader.snapshots import preload as preload_snapshots
from proxy.supervisor.pending_counts import keep as keep_pending
from proxy.supervisor.pending_counts import restore as restore_pending
from proxy.worker.factory import AREA_ENV

log = logging.getLogger("proxy.server")

LEADER_BACKOFF_FIRST = 0.25
LEADER_BACKOFF_MAX = 30.0
LEADER_STABLE_AFTER = 30.0  # a leader that lived this long resets the backoff
# A new leader's first beat waits for `spawn` to import everything (slow on busy CPUs) and for it to resume
# from the manifest: it is allowed this much more than leader_heartbeat_timeout_seconds.
LEADER_FIRST_BEAT_GRACE = 20.0


class LeaderSupervisor:
    """Keeps exactly one leader process running; restarts it with backoff when it dies or stops beating.

    A hung leader (blocked loop, SIGSTOP, deadlock) is alive to `is_alive()` but its heartbeat word in the
    area's control mmap stops moving: after `leader_heartbeat_timeout_seconds` it is SIGKILLed (by pid: it
    is our child) and replaced like a leader that died. The supervisor compares beats against its own
    clock of when it last saw the word change, so the two processes never compare timestamps.
    """

    def __init__(self, settings: Settings, area: Path) -> None:
        self.settings = settings
        self.area = area
        self.context = multiprocessing.get_context("spawn")
        self.process: multiprocessing.process.BaseProcess | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat_timeout = settings.leader_heartbeat_timeout_seconds
        self._heartbeat: Heartbeat | None = None
        self._started_at = 0.0
        self._last_beat = 0  # the word's value when it last changed
        self._last_beat_at = 0.0  # our monotonic clock then
        self._beaten = False  # has the current leader beaten at least once?

    def start(self) -> None:
        self._heartbeat = Heartbeat(self.area)
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="leader-watchdog", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        process = self.context.Process(target=run_leader, args=(str(self.area),), name="edge-proxy-leader")
        self._last_beat = self._heartbeat.read() if self._heartbeat is not None else 0  # the previous leader's
        process.start()
        self.process = process
        self._started_at = self._last_beat_at = time.monotonic()
        self._beaten = False
        log.info("leader started (pid %s)", process.pid)

    def _watch(self) -> None:
        backoff = LEADER_BACKOFF_FIRST
        while not self._stopping.is_set():
            assert self.process is not None
            self.process.join(timeout=0.2)
            if self._stopping.is_set():
                continue
            if self.process.is_alive():
                if self._silent_for() is not None:
                    self._kill_hung()
                continue
            if time.monotonic() - self._started_at > LEADER_STABLE_AFTER:
                backoff = LEADER_BACKOFF_FIRST
            log.error(
                "leader (pid %s) exited with code %s; restarting in %.2fs; workers keep serving",
                self.process.pid,
                self.process.exitcode,
                backoff,
            )
            if self._stopping.wait(backoff):
                return
            self.restarts += 1
            from proxy.metrics import prometheus as metrics

            metrics.LEADER_RESTARTS.inc()
            self._spawn()
            backoff = min(backoff * 2, LEADER_BACKOFF_MAX)

    def _silent_for(self) -> float | None:
        """Seconds the current leader has not beaten, once that exceeds its allowance; else None."""
        if self._heartbeat is None:
            return None
        now = time.monotonic()
        beat = self._heartbeat.read()
        if beat != self._last_beat:
            self._last_beat, self._last_beat_at, self._beaten = beat, now, True
            return None
        allowed = self.heartbeat_timeout + (0 if self._beaten else LEADER_FIRST_BEAT_GRACE)
        silent = now - self._last_beat_at
        return silent if silent > allowed else None

    def _kill_hung(self) -> None:
        assert self.process is not None and self.process.pid is not None
        log.error(
            "leader (pid %s) has not sent a heartbeat for %.1fs (leader_heartbeat_timeout_seconds=%g); "
            "killing it; workers keep serving",
            self.process.pid,
            time.monotonic() - self._last_beat_at,
            self.heartbeat_timeout,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)  # works on a stopped process too
        self.process.join(timeout=5)  # the loop then restarts it like any dead leader

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        process = self.process
        if process is not None and process.is_alive():
            process.terminate()
            process.join(timeout=drain_seconds(self.settings))  # its final flushes need this long at most
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        if self._heartbeat is not None:
            self._heartbeat.close()
            self._heartbeat = None
        log.info("leader stopped (restarted %d time(s))", self.restarts)


def connection_bound(options: GranianOptions, settings: Settings) -> int:
    """Connections one worker accepts (Granian's backpressure). Granian's default, backlog / workers, would
    cap a worker at ~1,024 connections, below `realtime.max_streams_per_worker`: stream 1,025 would hang
    unanswered instead of getting the bound's 503. So by default each worker takes its stream bound plus
    the backlog, leaving ordinary requests the share they had without streams."""
    if options.backpressure is not None:
        return options.backpressure
    streams = settings.realtime.max_streams_per_worker if settings.realtime.enabled else 0
    return options.backlog + streams


def raise_open_files_limit(options: GranianOptions, settings: Settings) -> None:
    """Lift the soft RLIMIT_NOFILE towards the hard one: every worker may hold `connection_bound`
    sockets, and a shell's soft limit (often 1,024) would fail accept() long before that."""
    import resource

    workers = max(options.workers, 1)  # already resolved from 0 ("the CPUs") when the options were loaded
    wanted = connection_bound(options, settings) * workers + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("raised the open-files limit from %d to %d", soft, target)
    if target < wanted:
        log.warning(
            "the open-files hard limit (%d) is below what %d worker(s) may hold (%d): raise it (ulimit -n) "
            "or lower realtime.max_streams_per_worker",
            hard,
            workers,
            wanted,
        )


def granian_kwargs(options: GranianOptions, settings: Settings) -> dict[str, Any]:
    from granian.constants import HTTPModes, Interfaces, Loops, RuntimeModes, TaskImpl
    from granian.http import HTTP1Settings, HTTP2Settings

    kwargs: dict[str, Any] = {
        "address": options.host,
        "port": options.port,
        "interface": Interfaces.ASGI,
        "workers": options.workers,
        "factory": True,
        "websockets": False,
        "loop": Loops(options.loop),
        "runtime_threads": options.runtime_threads,
        "runtime_mode": RuntimeModes(options.runtime_mode),
        "task_impl": TaskImpl(options.task_impl),
        "http": HTTPModes(options.http),
        "backlog": options.backlog,
        "backpressure": connection_bound(options, settings),
        "http1_settings": HTTP1Settings(
            keep_alive=options.http1_keep_alive, header_read_timeout=options.http1_header_read_timeout
        ),
        "http2_settings": HTTP2Settings(
            max_concurrent_streams=options.http2_max_concurrent_streams,
            keep_alive_interval=options.http2_keep_alive_interval,
        ),
        "respawn_failed_workers": options.respawn_failed_workers,
        "respawn_interval": options.respawn_interval,
        "workers_kill_timeout": options.workers_kill_timeout,
        "workers_lifetime": options.workers_lifetime,
        "workers_max_rss": options.workers_max_rss,
        "log_dictconfig": logging_config(settings.logging),
        "log_access": options.access_log or settings.logging.enable_access_log,
        "metrics_enabled": options.metrics,
        "metrics_address": options.metrics_address,
        "metrics_port": options.metrics_port,
    }
    if options.access_log_fmt:
        kwargs["log_access_format"] = options.access_log_fmt
    if options.ssl_certificate and options.ssl_keyfile:  # given together (checked when loaded)
        from granian.constants import SSLProtocols

        kwargs.update(
            ssl_cert=Path(options.ssl_certificate),
            ssl_key=Path(options.ssl_keyfile),
            ssl_key_password=options.ssl_keyfile_password,
            ssl_protocol_min=SSLProtocols(options.ssl_protocol_min),
        )
    return kwargs


def create_bucket_tables(settings: Settings, area: Path) -> None:
    """The rate limits' token buckets, shared by the workers (proxy/area/buckets.py), before they start."""
    limits = settings.rate_limits
    for name, rule in (("per_client_address", limits.per_client_address), ("per_key", limits.per_key)):
        if rule is not None:
            buckets.create(buckets.table_path(area, name), limits.table_entries)


def serve(settings: Settings, options: GranianOptions, area: Area) -> int:
    """Serve until SIGINT/SIGTERM; `area` is already created and the metrics directory pointed into it."""
    from granian import Granian

    try:
        write_settings(area.path, settings)
    except AreaError as exc:
        area.remove()
        print(f"edge-proxy: {exc}", file=sys.stderr)
        return 2
    # The settings' environment overrides (keys, tokens, secrets) were read once; the leader and the workers
    # must not carry them in their environment (Linux also caps one variable at 128 KiB).
    for name in secret_variables(os.environ):
        del os.environ[name]
    os.environ[AREA_ENV] = str(area.path)
    os.environ[WORKERS_ENV] = str(options.workers)
    raise_open_files_limit(options, settings)
    preload_snapshots(settings, area.path)  # before the workers' first load: a cold start serves at once
    _carefully(restore_pending, settings, area.path)  # counts a previous exit kept, before the leader forwards
    create_bucket_tables(settings, area.path)
    supervisor = LeaderSupervisor(settings, area.path)
    server = Granian("proxy.worker.factory:create_app", **granian_kwargs(options, settings))
    server.on_startup(supervisor.start)
    server.on_shutdown(supervisor.stop)
    try:
        server.serve()
    finally:
        supervisor.stop()
        # the leader is gone (stopped or killed) and the workers too: nothing writes to the area any more
        _carefully(keep_pending, settings, area.path)
        area.remove()
    return 0


def _carefully(step: Callable[[Settings, Path], None], settings: Settings, area: Path) -> None:
    # counts kept across a restart are worth a log line, never a failed start or an exit without cleanup
    try:
        step(settings, area)
    except Exception:
        log.exception("%s failed", step.__name__)
