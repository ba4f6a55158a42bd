"""An environment document evaluated without an identity, and its answers file.

`EvaluatedEnvironment` is what both sides start from: the leader builds one per new document to validate it
and encode its answers (`answers_for`, the bytes of `proxy/area/answers.py`'s file); a worker builds one
when an identity request first needs the environment's evaluator (`proxy/worker/evaluators.py`).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import orjson

from proxy.area import answers
from proxy.area.bodies import GZIP_MIN_BYTES, KeyKind, compress
from proxy.evaluation.engine import FlagResult, as_flags, evaluate_results, feature_objects, visible_to
from proxy.evaluation.mapping import MappedEnvironment, map_document

# What a key kind may see: the feature names (None: all) and whether disabled flags are hidden.
Visibility = tuple[frozenset[str] | None, bool]


class EvaluatedEnvironment:
    __slots__ = ("document", "environment_id", "features", "kinds", "mapped", "results", "updated_at")

    def __init__(self, document_bytes: bytes) -> None:
        """Raises what mapping raises (DocumentError, KeyError, ...) for a document that cannot be served."""
        document = orjson.loads(document_bytes)
        self.mapped: MappedEnvironment = map_document(document)
        self.document: dict[str, Any] = document
        found = document.get("id")
        # the document's numeric id: how traces (and metrics) name the environment, never by key
        self.environment_id: int | None = found if isinstance(found, int) and not isinstance(found, bool) else None
        self.updated_at: datetime | None = parse_updated_at(document.get("updated_at"))
        self.features = feature_objects(self.mapped)
        project = document["project"]
        server_only = set(project.get("server_key_only_feature_ids") or ())
        client_visible = frozenset(name for name, feature in self.features.items() if feature["id"] not in server_only)
        # indexed by KeyKind: clients see neither server-only features nor, with hide_disabled_flags, disabled ones
        self.kinds: tuple[Visibility, Visibility] = (
            (client_visible, bool(project.get("hide_disabled_flags"))),
            (None, False),
        )
        # One environment evaluation serves both kinds: only the filters differ.
        self.results: list[FlagResult] = evaluate_results(self.mapped, self.features)

    def visible_flags(self, kind: KeyKind) -> list[dict[str, Any]]:
        visible, hide_disabled = self.kinds[kind]
        return visible_to(as_flags(self.results), visible, hide_disabled)


def headers(updated_at: datetime | None) -> tuple[bytes | None, bytes | None]:
    """(X-Flagsmith-Document-Updated-At, Last-Modified) of a document updated at `updated_at`."""
    if updated_at is None:
        return None, None
    # Flagsmith's API sends epoch seconds of `updated_at`; browser SDKs read it to skip stale updates.
    last_modified = format_datetime(updated_at.replace(microsecond=0), usegmt=True)
    return repr(updated_at.timestamp()).encode(), last_modified.encode()


def document_etag(document_bytes: bytes) -> bytes:
    """The document's strong ETag (as sent plain): exact where Last-Modified's one-second precision is not."""
    return b'"' + hashlib.sha256(document_bytes).hexdigest()[:32].encode() + b'"'


def answers_for(document_bytes: bytes) -> bytes:
    """Evaluate `document_bytes` and encode the answers file; raises for a document that cannot be served."""
    return encode_answers(EvaluatedEnvironment(document_bytes), document_bytes)


def encode_answers(evaluated: EvaluatedEnvironment, document_bytes: bytes) -> bytes:
    client, server = (
        answers.KindAnswers([orjson.dumps(flag) for flag in flags], [flag["feature"]["name"] for flag in flags])
        for flags in (evaluated.visible_flags(kind) for kind in KeyKind)
    )
    document_gzip = compress(document_bytes) if len(document_bytes) >= GZIP_MIN_BYTES else None
    updated_at, last_modified = headers(evaluated.updated_at)
    etag = document_etag(document_bytes)
    return answers.encode(evaluated.environment_id, (updated_at, last_modified, etag), (client, server), document_gzip)


def parse_updated_at(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    # A naive timestamp is read as UTC (the Python proxy reads it as local time, a quirk); an offset such as
    # +02:00 is converted, since HTTP dates (Last-Modified) must be GMT.
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
