"""Counts kept for an unreachable upstream, carried across a restart in `snapshot_dir` or the snapshot Redis.

Analytics counts and usage batches that could not be forwarded live in the shared-memory area (the
leader's `pending.json` and `usage/batches.json`, and hand-overs it has not read yet), which `serve` removes
on exit. With `snapshot_dir` set, the main process, once the leader has stopped (however it stopped) and
before it removes the area, writes them to `<snapshot_dir>/pending-<uuid>.json`: 0600, fsynced, and
authenticated like snapshots (an HMAC-SHA256 keyed by a key derived from the proxy's secrets: the
`proxy_key`, else the configured server keys), so whoever can write the directory cannot make the proxy
send counts of theirs upstream. At the next start, of this replica or of another sharing the directory,
each file is claimed (renamed: one replica takes it), read, removed, and its counts put back into the area
before the leader starts, which forwards them as usual: usage batches unchanged, under their idempotency
keys.

With no `snapshot_dir` but a snapshot Redis (`snapshot_redis_url`, or `redis_url`), the same authenticated
blob is pushed onto the Redis list `edge-proxy:pending`, and a start claims each with LPOP (atomic: one
replica takes it).

Bounded: analytics at MAX_NAMES names (as in the area), usage at MAX_ROWS rows, a blob at MAX_BYTES, a start
claims MAX_CLAIMED blobs at most; beyond them counts are dropped, logged with their number. With neither
store they are dropped at exit, logged with their number. A file that does not authenticate (forged, corrupted,
or written under other secrets: a changed `proxy_key` or set of server keys) is dropped with a log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from proxy.area.mailboxes import MAX_NAMES, Counts, Inbox, add
from proxy.area.names import ANALYTICS, BATCHES, PENDING, USAGE
from proxy.config.masking import mask_urls_in
from proxy.config.settings import Settings
from proxy.leader.private_files import prepare_directory, write_private
from proxy.leader.snapshots import OWN_FILES, PENDING_PREFIX, redis_client
from proxy.leader.usage_reporting import Batch, load_batches, new_batches, save_batches

log = logging.getLogger("proxy.pending")

FORMAT_VERSION = 1
KEY_CONTEXT = b"edge-proxy pending counts v1"
PREFIX = PENDING_PREFIX
MAX_ROWS = 100_000  # usage rows kept across a restart (100 batches of 1,000)
MAX_BYTES = 64 * 1024 * 1024  # a larger file is not read
MAX_CLAIMED = 100  # kept blobs a start takes at most (the rest wait for the next start)
REDIS_LIST = "edge-proxy:pending"


def _key(settings: Settings) -> bytes:
    secret = settings.proxy_key or "\n".join(sorted(pair.server_side_key for pair in settings.environment_key_pairs))
    return hmac.new(secret.encode(), KEY_CONTEXT, hashlib.sha256).digest()


def _usage_rows(batches: list[Batch]) -> int:
    return sum(len(rows) for _, rows in batches)


def _analytics_total(counts: Mapping[str, Mapping[str, int]]) -> int:
    return sum(sum(by_name.values()) for by_name in counts.values())


def keep(settings: Settings, area: Path) -> None:
    """At exit, the leader stopped: move what was not forwarded out of the area (or say what is lost)."""
    analytics_inbox = Inbox(area, ANALYTICS)
    analytics = analytics_inbox.take()
    usage_inbox = Inbox(area, USAGE)
    usage = load_batches(area / USAGE / BATCHES) + new_batches(usage_inbox.take())
    if not analytics and not usage:
        return
    counts, rows = _analytics_total(analytics), _usage_rows(usage)
    if not settings.snapshot_dir and not settings.snapshot_redis:
        log.warning(
            "%d analytics count(s) and %d usage row(s) not forwarded upstream are dropped at exit "
            "(set snapshot_dir or snapshot_redis_url to keep them across a restart)",
            counts,
            rows,
        )
        return
    kept: list[Batch] = []
    for idempotency_key, batch in usage:
        room = MAX_ROWS - _usage_rows(kept)
        if room <= 0:
            break
        kept.append((idempotency_key, batch[:room]))
    if _usage_rows(kept) < rows:
        log.warning("%d usage row(s) beyond the %d kept across a restart dropped", rows - _usage_rows(kept), MAX_ROWS)
    body = orjson.dumps({"analytics": analytics, "usage": kept})
    if len(body) > MAX_BYTES:
        log.warning("pending counts (%d bytes) exceed %d bytes: dropped at exit", len(body), MAX_BYTES)
        return
    header = {"format": FORMAT_VERSION, "mac": hmac.new(_key(settings), body, hashlib.sha256).hexdigest()}
    blob = orjson.dumps(header) + b"\n" + body
    try:
        where = _put_in_directory(Path(settings.snapshot_dir), blob) if settings.snapshot_dir else _push(settings, blob)
    except Exception as exc:  # OSError, or any Redis error: say what is lost, never fail the exit
        log.error("pending counts could not be kept, dropped: %s", mask_urls_in(str(exc)))
        return
    # written first, then the area's copies go (the area is removed next anyway)
    analytics_inbox.settle({})
    usage_inbox.settle({})
    with contextlib.suppress(FileNotFoundError):
        (area / USAGE / BATCHES).unlink()
    log.info(
        "%d analytics count(s) and %d usage row(s) not forwarded upstream kept in %s for the next start",
        counts,
        _usage_rows(kept),
        where,
    )


def _put_in_directory(directory: Path, blob: bytes) -> str:
    path = directory / f"{PREFIX}{uuid.uuid4()}.json"
    prepare_directory(directory, OWN_FILES, "snapshot_dir", report=False)
    write_private(path, blob, fsync=True)
    return path.name


def _push(settings: Settings, blob: bytes) -> str:
    client = redis_client(settings.snapshot_redis or "")
    try:
        client.rpush(REDIS_LIST, blob)
    finally:
        client.close()
    return f"the Redis list {REDIS_LIST}"


def _kept_blobs(settings: Settings) -> Iterator[tuple[str, bytes]]:
    """(name for the log, raw blob) of each kept blob this start claims."""
    if settings.snapshot_dir:
        for path in sorted(Path(settings.snapshot_dir).glob(f"{PREFIX}*.json"))[:MAX_CLAIMED]:
            raw = _claim_file(path)
            if raw is not None:
                yield path.name, raw
        return
    if not settings.snapshot_redis:
        return
    client = redis_client(settings.snapshot_redis)
    try:
        for index in range(MAX_CLAIMED):
            try:
                popped = client.lpop(REDIS_LIST)  # atomic: one replica takes each blob
            except Exception as exc:  # an unreachable Redis: nothing to restore now, serving starts anyway
                log.warning("kept counts in Redis not read: %s", mask_urls_in(str(exc)))
                return
            if not isinstance(popped, bytes):  # None: the list is empty (values are bytes: decode_responses is off)
                return
            yield f"{REDIS_LIST}[{index}]", popped
    finally:
        client.close()


def restore(settings: Settings, area: Path) -> None:
    """At start, before the leader: claim the kept files and put their counts back into the area."""
    analytics: Counts = defaultdict(Counter)
    usage: list[Batch] = []
    dropped_analytics = dropped_rows = files = 0
    for name, raw in _kept_blobs(settings):
        data = _verified(settings, name, raw)
        if data is None:
            continue
        files += 1
        for client_key, counts in (data.get("analytics") or {}).items():
            dropped_analytics += add(analytics, str(client_key), _counts(counts))
        for batch in data.get("usage") or []:
            rows = _rows(batch)
            if rows is None:
                continue
            room = max(0, MAX_ROWS - _usage_rows(usage))
            dropped_rows += max(0, len(rows[1]) - room)
            if room:
                usage.append((rows[0], rows[1][:room]))
    if not files:
        return
    if usage and not settings.proxy_key:
        log.warning("%d kept usage row(s) dropped: usage reporting is off (no proxy_key)", _usage_rows(usage))
        usage = []
    if dropped_analytics or dropped_rows:
        log.warning(
            "kept counts beyond the bounds dropped: %d analytics count(s) (%d names at most), %d usage row(s) "
            "(%d at most)",
            dropped_analytics,
            MAX_NAMES,
            dropped_rows,
            MAX_ROWS,
        )
    if analytics:
        (area / ANALYTICS).mkdir(exist_ok=True)
        (area / ANALYTICS / PENDING).write_bytes(orjson.dumps(analytics))
    if usage:
        save_batches(area / USAGE / BATCHES, load_batches(area / USAGE / BATCHES) + usage)
    log.info(
        "restored %d analytics count(s) and %d usage row(s) kept at a previous exit (%d kept blob(s))",
        _analytics_total(analytics),
        _usage_rows(usage),
        files,
    )


def _claim_file(path: Path) -> bytes | None:
    """The bytes of `path`, taken by this process (renamed, read, removed), or None."""
    claimed = path.with_name(f".{path.name}.claimed-{os.getpid()}")
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return None  # another replica took it
    try:
        with open(claimed, "rb") as kept:
            if os.fstat(kept.fileno()).st_size > MAX_BYTES:
                raise ValueError(f"larger than {MAX_BYTES} bytes")
            return kept.read()
    except (OSError, ValueError) as exc:
        log.warning("kept counts %s dropped: %s", path.name, exc)
        return None
    finally:
        with contextlib.suppress(OSError):
            claimed.unlink()  # before the counts reach the area: a crash loses them rather than sends them twice


def _verified(settings: Settings, name: str, raw: bytes) -> dict[str, Any] | None:
    """The content of a kept blob if it authenticates, else None (logged)."""
    try:
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        head, _, body = raw.partition(b"\n")
        header = orjson.loads(head)
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            raise ValueError("unknown format")
        expected = hmac.new(_key(settings), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(str(header.get("mac")), expected):
            raise ValueError("not authenticated (forged, corrupted, or kept under another proxy_key or server keys)")
        data = orjson.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return data
    except ValueError as exc:  # orjson's JSONDecodeError is a ValueError
        log.warning("kept counts %s dropped: %s", name, exc)
        return None


def _counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(name): count for name, count in value.items() if isinstance(count, int) and count > 0}


def _rows(value: Any) -> tuple[str, list[dict[str, Any]]] | None:
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], list)):
        return None
    return str(value[0]), [row for row in value[1] if isinstance(row, dict)]
