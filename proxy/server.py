"""`edge-proxy serve`: the main process. Embeds Granian, owns the shared-memory area, supervises the leader.

Start-up order: the area is created (cleaning up a SIGKILLed predecessor's), Granian's `on_startup` hook
spawns the leader (a `spawn`-context process) and its watchdog thread, then Granian starts the workers,
which attach to the area by path. Shutdown: Granian drains and stops the workers, `on_shutdown` stops the
leader, and the area is removed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

from proxy.leader.process import drain_seconds, run_leader
from proxy.logs import logging_config
from proxy.settings import Settings
from proxy.shm import Area
from proxy.worker import AREA_ENV, SETTINGS_ENV, encode_settings

log = logging.getLogger("proxy.server")

LEADER_BACKOFF_FIRST = 0.25
LEADER_BACKOFF_MAX = 30.0
LEADER_STABLE_AFTER = 30.0  # a leader that lived this long resets the backoff


class LeaderSupervisor:
    """Keeps exactly one leader process running; restarts it with backoff when it dies."""

    def __init__(self, settings: Settings, area: Path) -> None:
        self.settings = settings
        self.area = area
        self.context = multiprocessing.get_context("spawn")
        self.process: multiprocessing.process.BaseProcess | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="leader-watchdog", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        process = self.context.Process(
            target=run_leader, args=(self.settings, str(self.area)), name="edge-proxy-leader"
        )
        process.start()
        self.process = process
        self._started_at = time.monotonic()
        log.info("leader started (pid %s)", process.pid)

    def _watch(self) -> None:
        backoff = LEADER_BACKOFF_FIRST
        while not self._stopping.is_set():
            assert self.process is not None
            self.process.join(timeout=0.2)
            if self._stopping.is_set() or self.process.is_alive():
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
            from proxy import metrics

            metrics.LEADER_RESTARTS.inc()
            self._spawn()
            backoff = min(backoff * 2, LEADER_BACKOFF_MAX)

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
        log.info("leader stopped (restarted %d time(s))", self.restarts)


def granian_kwargs(options: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from granian.constants import HTTPModes, Interfaces, Loops, RuntimeModes, TaskImpl
    from granian.http import HTTP1Settings, HTTP2Settings

    kwargs: dict[str, Any] = {
        "address": options["host"],
        "port": options["port"],
        "interface": Interfaces.ASGI,
        "workers": options["workers"],
        "factory": True,
        "websockets": False,
        "loop": Loops(options["loop"]),
        "runtime_threads": options["runtime_threads"],
        "runtime_mode": RuntimeModes(options["runtime_mode"]),
        "task_impl": TaskImpl(options["task_impl"]),
        "http": HTTPModes(options["http"]),
        "backlog": options["backlog"],
        "backpressure": options["backpressure"],
        "http1_settings": HTTP1Settings(
            keep_alive=options["http1_keep_alive"], header_read_timeout=options["http1_header_read_timeout"]
        ),
        "http2_settings": HTTP2Settings(
            max_concurrent_streams=options["http2_max_concurrent_streams"],
            keep_alive_interval=options["http2_keep_alive_interval"],
        ),
        "respawn_failed_workers": options["respawn_failed_workers"],
        "respawn_interval": options["respawn_interval"],
        "workers_kill_timeout": options["workers_kill_timeout"],
        "workers_lifetime": options["workers_lifetime"],
        "workers_max_rss": options["workers_max_rss"],
        "log_dictconfig": logging_config(settings.logging),
        "log_access": options["access_log"] or settings.logging.enable_access_log,
        "metrics_enabled": options["metrics"],
        "metrics_address": options["metrics_address"],
        "metrics_port": options["metrics_port"],
    }
    if options["access_log_fmt"]:
        kwargs["log_access_format"] = options["access_log_fmt"]
    if options["ssl_certificate"]:
        from granian.constants import SSLProtocols

        kwargs.update(
            ssl_cert=Path(options["ssl_certificate"]),
            ssl_key=Path(options["ssl_keyfile"]),
            ssl_key_password=options["ssl_keyfile_password"],
            ssl_protocol_min=SSLProtocols(options["ssl_protocol_min"]),
        )
    return kwargs


def serve(settings: Settings, options: dict[str, Any], area: Area) -> int:
    """Serve until SIGINT/SIGTERM; `area` is already created (the caller set PROMETHEUS_MULTIPROC_DIR)."""
    from granian import Granian

    os.environ[AREA_ENV] = str(area.path)
    os.environ[SETTINGS_ENV] = encode_settings(settings)
    supervisor = LeaderSupervisor(settings, area.path)
    server = Granian("proxy.worker:create_app", **granian_kwargs(options, settings))
    server.on_startup(supervisor.start)
    server.on_shutdown(supervisor.stop)
    try:
        server.serve()
    finally:
        supervisor.stop()
        area.remove()
    return 0
