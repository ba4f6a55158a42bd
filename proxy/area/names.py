"""Every name inside the shared-memory area, in one place: who writes each file and who reads it.

    <area>/                          (default /dev/shm/edge-proxy.<port>; created by the main process)
      lock                           flock of the live instance (supervisor/server.py via Area)
      settings.json                  the validated settings, 0600, for the leader and workers (settings_file.py)
      control                        4 KiB mmap: magic, generation, leader heartbeat (publication.py)
      manifest.json                  every environment's entry, rewritten every few generations (publication.py)
      journal/<generation>.json      what one generation changed (publication.py)
      env-<key hash>-<gen>.json      a published document, immutable (publication.py)
      env-<key hash>-<gen>.answers   its pre-encoded environment-level answers, immutable (answers.py)
      metrics/                       prometheus-client's multiprocess files (metrics/directory.py)
        .archive.lock                shared by scrapes, exclusive while dead processes are folded (processes.py)
      processes/<pid>                role and start time of each process writing metrics (processes.py)
        <pid>.dead                   a dead process whose counters are not archived yet (processes.py)
      buckets-<limit>                a rate limit's token buckets, shared by the workers (buckets.py)
      analytics/<pid>-<n>.json       SDK analytics a worker hands to the leader (mailboxes.py)
      usage/<pid>-<n>.json           usage counts a worker hands to the leader (mailboxes.py)
        pending.json                 (both folders) what the leader could not forward yet
        batches.json                 (usage) reports built and not yet accepted (leader/usage_reporting.py)
      refresh/<pid>-<n>.json         a verified webhook's refresh request (http/webhook.py → leader/refresh.py)
      webhooks-seen/<signature>      replay markers (http/webhook.py; pruned by leader/refresh.py)

Files are written to a temporary name (`.<name>.<pid>.tmp`, hidden from every glob below) and renamed.
File names never reveal keys: environments are named by `key_hash`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LOCK = "lock"
SETTINGS = "settings.json"
CONTROL = "control"
MANIFEST = "manifest.json"
JOURNAL = "journal"
METRICS = "metrics"
ARCHIVE_LOCK = ".archive.lock"  # not *.db: prometheus-client's collector reads every *.db in the folder
PROCESSES = "processes"
DEAD = ".dead"  # `<pid>.dead` in processes/: a dead process whose counters are not archived yet
ANALYTICS = "analytics"
USAGE = "usage"
PENDING = "pending.json"
BATCHES = "batches.json"
REFRESH = "refresh"
WEBHOOKS_SEEN = "webhooks-seen"

DOCUMENT_SUFFIX = ".json"
ANSWERS_SUFFIX = ".answers"
PUBLISHED_GLOB = "env-*"  # every published file, documents and answers
HANDED_OVER_GLOB = "[0-9]*.json"  # a worker's hand-over files (analytics, usage, refresh), not pending.json


def key_hash(client_key: str) -> str:
    # File names must not reveal keys.
    return hashlib.sha256(client_key.encode()).hexdigest()[:16]


def area_path(base_dir: str, port: int) -> Path:
    return Path(base_dir) / f"edge-proxy.{port}"


def document_file(client_key: str, generation: int) -> str:
    return f"env-{key_hash(client_key)}-{generation}{DOCUMENT_SUFFIX}"


def answers_file(client_key: str, generation: int) -> str:
    return f"env-{key_hash(client_key)}-{generation}{ANSWERS_SUFFIX}"


def buckets_file(limit: str) -> str:
    return f"buckets-{limit}"


def generation_of(file: str | None) -> int | None:
    """The generation a published file was written in (`env-<hash>-<generation>.<suffix>`), or None."""
    if not file:
        return None
    try:
        return int(file.rsplit("-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return None


def journal_file(generation: int) -> str:
    return f"{generation}.json"


def temporary(path: Path) -> Path:
    """Where `path` is written before its rename: hidden (a leading dot), per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def handed_over(pid: int, sequence: int) -> str:
    """A worker's hand-over file in a mailbox folder (analytics, usage, refresh)."""
    return f"{pid}-{sequence}.json"
