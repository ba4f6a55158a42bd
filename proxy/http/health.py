"""Health as the Python proxy reports it, computed from the leader's manifest entry for each environment.

Body: `status`, `reason`, `last_successful_update` (UTC, `Z`), plus `environments` naming the stale,
never-loaded or failed-to-build ones when there are any. An environment is stale when its last good
answer from upstream is older than `poll + grace × number of pairs` (the Python proxy's rule). One served
from a persisted snapshot (no upstream answer yet) counts as ready while the snapshot is younger than
`health_check.snapshot_max_age_seconds`, unless `health_check.snapshot_counts_as_ready` is off. `sources`
names each environment's source (`upstream`, `file`, `snapshot`) and the age of its data in seconds; it is
left out (the Python proxy's body) while every environment comes from upstream, unless `show_details`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.area.manifest import ManifestEntry
from proxy.config.masking import mask_key
from proxy.config.sections import ReadinessMode
from proxy.config.settings import Settings

NOT_UPDATED = "environment document(s) not updated."
STALE = "environment document(s) stale."


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stale_after(settings: Settings, environments: int) -> float | None:
    """Seconds without a good answer from upstream after which an environment is stale (None: never)."""
    grace = settings.health_check.environment_update_grace_period_seconds
    return None if grace is None else settings.api_poll_frequency_seconds + grace * environments


def check_health(
    settings: Settings,
    client_keys: Collection[str],
    entries: Mapping[str, ManifestEntry],
    build_errors: Mapping[str, str],
    now: float,
    waiting_for_discovery: bool = False,
    show_details: bool | None = None,
) -> tuple[int, bytes]:
    """`show_details`: None follows `health_check.show_details` (the caller narrows it to access.operations)."""
    threshold = stale_after(settings, len(client_keys))
    not_loaded: list[str] = []
    stale: list[str] = []
    successes: list[float] = []
    checks = settings.health_check
    for client_key in client_keys:
        entry = entries.get(client_key)
        last = entry.last_success if entry is not None else None
        if entry is not None and entry.source == "snapshot" and entry.location is not None:
            age = now - (entry.snapshot_saved_at or 0)
            max_age = checks.snapshot_max_age_seconds
            if not checks.snapshot_counts_as_ready or (max_age is not None and age > max_age):
                stale.append(client_key)
            continue
        if last is None or entry is None or entry.location is None:
            not_loaded.append(client_key)
            continue
        successes.append(last)
        if threshold is not None and now - last > threshold:
            stale.append(client_key)
    # A worker that could not build the published document serves an older one (or none): not fresh.
    failed = [key for key in client_keys if key in build_errors]
    unfit = set(not_loaded) | set(stale) | set(failed)

    fresh = len(client_keys) - len(unfit)
    if settings.health_check.fail_readiness_when == ReadinessMode.all_stale:
        failing = bool(client_keys) and fresh == 0
        reason = NOT_UPDATED if not successes else STALE
    else:
        failing = bool(unfit)
        reason = NOT_UPDATED if not_loaded or (failed and not stale) else STALE
    if waiting_for_discovery:  # with a proxy_key, nothing is known to serve before the first sync
        failing, reason = True, NOT_UPDATED
    # as the Python proxy: no timestamp until every environment has loaded, unless that is tolerated
    last_update = min(successes) if successes and not (not_loaded and failing) else None

    body: dict[str, Any] = {
        "status": "error" if failing else "ok",
        "reason": reason if failing else None,
        "last_successful_update": _iso(last_update) if last_update is not None else None,
    }
    show = settings.health_check.show_details if show_details is None else show_details
    details: dict[str, Any] = {
        name: [_describe(key, entries, show) for key in keys]
        for name, keys in (("stale", stale), ("not_loaded", not_loaded))
        if keys
    }
    if failed:
        details["failed_to_build"] = [
            {"key": mask_key(key), "error": "build_failed", **({"last_error": build_errors[key]} if show else {})}
            for key in failed
        ]
    if waiting_for_discovery:
        details["proxy_config"] = "not synced yet"
    if details:
        body["environments"] = details
    # the Python proxy's body as long as everything comes from upstream (conformance); otherwise say where from
    sources = [_source(key, entries, now) for key in client_keys]
    if show or any(entry["source"] in ("snapshot", "file") for entry in sources):
        body["sources"] = sources
    return (503 if failing else 200), orjson.dumps(body)


def _source(client_key: str, entries: Mapping[str, ManifestEntry], now: float) -> dict[str, Any]:
    entry = entries.get(client_key) or ManifestEntry()
    source = entry.source if entry.location is not None else None
    since = entry.snapshot_saved_at if source == "snapshot" else entry.last_success
    age = round(now - since, 1) if source and since is not None else None
    return {"key": mask_key(client_key), "source": source, "age_seconds": age}


def _describe(client_key: str, entries: Mapping[str, ManifestEntry], show_details: bool) -> dict[str, Any]:
    entry = entries.get(client_key) or ManifestEntry()
    described = {"key": mask_key(client_key), "name": entry.name, "error": entry.error_kind}
    if show_details:  # the full text may name internal hosts: only when the operator asked for it
        described["last_error"] = entry.last_error
    return described
