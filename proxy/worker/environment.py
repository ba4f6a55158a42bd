"""Per-environment state a worker serves from, built once per published document, then immutable.

Everything that does not depend on the request is computed here: the engine context, the override
index, the encoded environment-level responses (full list and each single flag, per key kind, plain
and gzip) and the compiled evaluator (proxy/evaluation/compiled.py). A request then costs a dict lookup, or one
compiled identity evaluation. What the compiled evaluator cannot reproduce goes to flag-engine, with a
log line and `edge_proxy_evaluator_fallbacks_total`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import orjson

from proxy.area.bodies import Body, KeyKind
from proxy.config.settings import mask_key
from proxy.evaluation.compiled import CompiledEnvironment
from proxy.evaluation.conditions import NeedsEngine, Unsupported
from proxy.evaluation.engine import (
    ENGINE_ERRORS,
    FlagResult,
    as_flags,
    evaluate,
    evaluate_results,
    feature_objects,
    visible_results,
    visible_to,
)
from proxy.evaluation.mapping import MappedEnvironment, map_document
from proxy.http.errors import TraitsUnevaluable
from proxy.metrics import prometheus as metrics

log = logging.getLogger("proxy.evaluator")


@dataclass(frozen=True, slots=True)
class KindView:
    """What one key kind (client or server) sees of an environment."""

    visible: frozenset[str] | None  # flag names this kind may see; None means every flag
    hide_disabled: bool
    flags: Body
    single: dict[str, Body]  # flag name → encoded single flag (absent: 404)


class EnvironmentState:
    __slots__ = (
        "client_key",
        "compiled",
        "document",
        "environment_id",
        "environment_results",
        "etag",
        "etag_gzip",
        "features",
        "last_modified",
        "mapped",
        "updated_at",
        "updated_at_header",
        "views",
    )

    def __init__(self, client_key: str, document_bytes: bytes) -> None:
        document = orjson.loads(document_bytes)
        self.mapped: MappedEnvironment = map_document(document)
        self.client_key = client_key
        self.document = Body.of(document_bytes)
        # Strong validators of /api/v1/environment-document/, one per representation (plain, gzip), computed
        # once per published document: exact where Last-Modified's one-second precision is not (proxy tiers).
        digest = hashlib.sha256(document_bytes).hexdigest()[:32].encode()
        self.etag = b'"' + digest + b'"'
        self.etag_gzip = b'"' + digest + b'-gzip"'
        found = document.get("id")
        # the document's numeric id: how traces (and metrics) name the environment, never by key
        self.environment_id: int | None = found if isinstance(found, int) and not isinstance(found, bool) else None
        self.updated_at: datetime | None = parse_updated_at(document.get("updated_at"))
        # Flagsmith's API sends epoch seconds of `updated_at`; browser SDKs read it to skip stale updates.
        self.updated_at_header: bytes | None = repr(self.updated_at.timestamp()).encode() if self.updated_at else None
        self.last_modified: bytes | None = (
            format_datetime(self.updated_at.replace(microsecond=0), usegmt=True).encode() if self.updated_at else None
        )
        self.features = feature_objects(self.mapped)
        project = document["project"]
        server_only = set(project.get("server_key_only_feature_ids") or ())
        client_visible = frozenset(name for name, feature in self.features.items() if feature["id"] not in server_only)
        hide_disabled = bool(project.get("hide_disabled_flags"))
        # One environment evaluation serves both kinds: only the filters differ.
        self.environment_results = evaluate_results(self.mapped, self.features)
        all_flags = as_flags(self.environment_results)
        self.views = (
            self._view(all_flags, client_visible, hide_disabled),
            self._view(all_flags, None, False),
        )
        self.compiled = self._compile()

    @staticmethod
    def _view(all_flags: list[dict[str, Any]], visible: frozenset[str] | None, hide_disabled: bool) -> KindView:
        flags = visible_to(all_flags, visible, hide_disabled)
        return KindView(
            visible=visible,
            hide_disabled=hide_disabled,
            flags=Body.of(orjson.dumps(flags)),
            single={flag["feature"]["name"]: Body.of(orjson.dumps(flag)) for flag in flags},
        )

    def _compile(self) -> CompiledEnvironment | None:
        masked = mask_key(self.client_key)

        def segment_fallback(segment: str, reason: str, detail: str) -> None:
            log.warning("environment %s: segment %r is evaluated by flag-engine (%s)", masked, segment, detail)
            metrics.EVALUATOR_FALLBACKS.labels(reason=reason, scope="segment").inc()

        kinds = [(view.visible, view.hide_disabled) for view in self.views]
        try:
            return CompiledEnvironment(self.mapped, self.features, kinds, segment_fallback)
        except Unsupported as exc:
            reason, detail = exc.reason, exc.detail
        except Exception as exc:  # data the compiler did not expect: flag-engine answers (or raises) as before
            reason, detail = "compile_error", f"{type(exc).__name__}: {exc}"
        log.warning("environment %s: identities are evaluated by flag-engine (%s)", masked, detail)
        metrics.EVALUATOR_FALLBACKS.labels(reason=reason, scope="environment").inc()
        return None

    # -- what the HTTP layer reads (the seam `proxy/worker/served.py` names) ---------------------------
    def flags(self, kind: KeyKind) -> Body:
        """`GET /api/v1/flags/` as `kind` sees it."""
        return self.views[kind].flags

    def flag(self, kind: KeyKind, name: str) -> Body | None:
        """`GET /api/v1/flags/?feature=name` as `kind` sees it; None: not there (or hidden from `kind`)."""
        return self.views[kind].single.get(name)

    @property
    def feature_names(self) -> Collection[str]:
        return self.features.keys()

    async def ready_for_identities(self) -> None:
        """The evaluator is built with the state: nothing to wait for."""

    def identity_body(
        self, kind: KeyKind, identifier: str, echo: list[dict[str, Any]], traits: dict[str, Any]
    ) -> bytes:
        """The encoded identity response: `{"identifier", "traits": echo, "flags"}` as `kind` sees them."""
        if self.compiled is not None:
            try:
                return self.compiled.body(kind, identifier, echo, traits)
            except NeedsEngine:
                _request_fallback()
        flags = self._engine_flags(kind, identifier, traits)
        # A copy: orjson's output keeps its growth buffer (a 57 KB body held 260 KB), and this one is cached.
        return bytes(memoryview(orjson.dumps({"identifier": identifier, "traits": echo, "flags": flags})))

    def identity_flags(self, kind: KeyKind, identifier: str, traits: dict[str, Any]) -> list[dict[str, Any]]:
        if self.compiled is not None:
            try:
                return as_flags(self.compiled.results(kind, identifier, traits))
            except NeedsEngine:
                _request_fallback()
        return self._engine_flags(kind, identifier, traits)

    def _engine_flags(self, kind: KeyKind, identifier: str, traits: dict[str, Any]) -> list[dict[str, Any]]:
        view = self.views[kind]
        try:
            flags = evaluate(self.mapped, self.features, identifier, traits)
        except ENGINE_ERRORS as exc:
            raise TraitsUnevaluable(exc) from None
        return visible_to(flags, view.visible, view.hide_disabled)

    def identity_results(
        self, kind: KeyKind, identifier: str | None, traits: dict[str, Any] | None = None
    ) -> list[FlagResult]:
        """Flags with reasons and variants as `kind` sees them; no identifier: the environment's flags."""
        view = self.views[kind]
        if identifier is None:
            return visible_results(self.environment_results, view.visible, view.hide_disabled)
        if self.compiled is not None:
            try:
                return self.compiled.results(kind, identifier, traits or {})
            except NeedsEngine:
                _request_fallback()
        try:
            results = evaluate_results(self.mapped, self.features, identifier, traits)
        except ENGINE_ERRORS as exc:
            raise TraitsUnevaluable(exc) from None
        return visible_results(results, view.visible, view.hide_disabled)


def _request_fallback() -> None:
    # Traits the engine raises on or coerces unusually (a number too long for float()): rare and
    # client-driven, so counted but not logged.
    metrics.EVALUATOR_FALLBACKS.labels(reason="unusual_trait", scope="request").inc()


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
