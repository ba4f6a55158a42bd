"""`GET /proxy/status`: per-environment state in the style of LaunchDarkly Relay's `/status`, and the proxy's.

Per environment (by masked client key): `state` (`valid`: the last fetch succeeded; `interrupted`: it
failed and the last good document is served; `initializing`: no fetch has succeeded yet), `since` when,
`last_error` (its kind always; its text only when the endpoint is behind `status_token` or
`health_check.show_details` is on: it may name internal hosts), the last 200 and 304 times, the document's
`updated_at`, its `source`, `size` and the `generation` it was published in. For the proxy: version,
workers, leader restarts and the snapshot store's state. Keys are always masked.
"""

from __future__ import annotations

import hmac
import os
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from typing import Any

import orjson

from proxy.area.manifest import ManifestEntry
from proxy.area.names import generation_of
from proxy.config.masking import mask_key
from proxy.config.settings import Settings
from proxy.worker.store import Store

WORKERS_ENV = "EDGE_PROXY_WORKERS"  # set by `edge-proxy serve` for its workers


@cache
def proxy_version() -> str:
    try:
        return metadata.version("edge-proxy")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def authorized(settings: Settings, authorization: bytes | None) -> bool:
    token = settings.status_token
    if token is None:
        return True
    expected = b"Bearer " + token.encode()
    return authorization is not None and hmac.compare_digest(authorization, expected)


def _environment(entry: ManifestEntry, build_error: str | None, details: bool) -> dict[str, Any]:
    error = None
    if entry.error_kind or build_error:
        error = {
            "kind": entry.error_kind or "build_failed",
            "message": (entry.last_error or build_error) if details else None,
        }
    location = entry.location
    return {
        "name": entry.name,
        "state": entry.state or "initializing",
        "since": _iso(entry.state_since),
        "last_error": error,
        "last_200": _iso(entry.last_200),
        "last_304": _iso(entry.last_304),
        "last_success": _iso(entry.last_success),
        "updated_at": entry.updated_at,
        "source": entry.source if location is not None else None,
        "snapshot_saved_at": _iso(entry.snapshot_saved_at),
        "size": location.length if location is not None else None,
        "generation": generation_of(location.file if location is not None else None),
    }


def status_body(settings: Settings, store: Store) -> bytes:
    details = settings.status_token is not None or settings.health_check.show_details
    environments = {
        mask_key(client_key): _environment(
            store.entries.get(client_key) or ManifestEntry(), store.build_errors.get(client_key), details
        )
        for client_key in store.keys.client_keys
    }
    meta = store.meta
    snapshots = meta.get("snapshots")
    if snapshots is not None:
        snapshots = {**snapshots, "last_write": _iso(snapshots.get("last_write"))}
        if not details and snapshots.get("last_error"):
            snapshots["last_error"] = snapshots["last_error"].split(":", 1)[0]  # "read failed" / "write failed"
    workers = os.environ.get(WORKERS_ENV)
    body = {
        "proxy": {
            "version": proxy_version(),
            "workers": int(workers) if workers and workers.isdigit() else None,
            "worker_pid": os.getpid(),
            "generation": store.generation,
            "leader_restarts": meta.get("leader_restarts", 0),
            "leader_started_at": _iso(meta.get("leader_started_at")),
            "snapshot_store": snapshots or {"kind": None, "state": "disabled"},
        },
        "environments": environments,
    }
    return orjson.dumps(body)
