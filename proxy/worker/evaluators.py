"""Identity evaluation, built per worker only for the environments that need it, and bounded.

Environment-level answers come pre-encoded from the leader (`proxy/area/answers.py`), so a worker builds an
environment's evaluator (the document mapped, evaluated and compiled: `Evaluator`) only when an identity
request first needs it, in a thread so the event loop keeps serving; concurrent first requests share the
one build. `Evaluators` keeps the most recently used `endpoint_caches.identities.compiled_environments` of
them and drops the
least recently used beyond that. An environment whose document changes while its evaluator is kept gets
the new evaluator built ahead of time, in the Follower's thread, with the new state (`prebuild`).

What the compiled evaluator cannot reproduce goes to flag-engine, with a log line and
`edge_proxy_evaluator_fallbacks_total`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from proxy.area.bodies import KeyKind
from proxy.config.masking import mask_key
from proxy.evaluation.compiled import CompiledEnvironment
from proxy.evaluation.conditions import NeedsEngine, Unsupported
from proxy.evaluation.engine import (
    ENGINE_ERRORS,
    FlagResult,
    as_flags,
    evaluate,
    evaluate_results,
    visible_results,
    visible_to,
)
from proxy.evaluation.environment import EvaluatedEnvironment
from proxy.http.errors import TraitsUnevaluable
from proxy.metrics import prometheus as metrics

if TYPE_CHECKING:
    from proxy.worker.environment import EnvironmentState

log = logging.getLogger("proxy.evaluator")


class Evaluator:
    """One environment's identity evaluation: the compiled evaluator, flag-engine where it cannot answer."""

    __slots__ = ("client_key", "compiled", "evaluated")

    def __init__(self, client_key: str, document_bytes: bytes) -> None:
        self.client_key = client_key
        self.evaluated = EvaluatedEnvironment(document_bytes)
        self.compiled = self._compile()

    def _compile(self) -> CompiledEnvironment | None:
        masked = mask_key(self.client_key)

        def segment_fallback(segment: str, reason: str, detail: str) -> None:
            log.warning("environment %s: segment %r is evaluated by flag-engine (%s)", masked, segment, detail)
            metrics.EVALUATOR_FALLBACKS.labels(reason=reason, scope="segment").inc()

        evaluated = self.evaluated
        try:
            return CompiledEnvironment(evaluated.mapped, evaluated.features, list(evaluated.kinds), segment_fallback)
        except Unsupported as exc:
            reason, detail = exc.reason, exc.detail
        except Exception as exc:  # data the compiler did not expect: flag-engine answers (or raises) as before
            reason, detail = "compile_error", f"{type(exc).__name__}: {exc}"
        log.warning("environment %s: identities are evaluated by flag-engine (%s)", masked, detail)
        metrics.EVALUATOR_FALLBACKS.labels(reason=reason, scope="environment").inc()
        return None

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
        evaluated = self.evaluated
        try:
            flags = evaluate(evaluated.mapped, evaluated.features, identifier, traits)
        except ENGINE_ERRORS as exc:
            raise TraitsUnevaluable(exc) from None
        return visible_to(flags, *evaluated.kinds[kind])

    def identity_results(
        self, kind: KeyKind, identifier: str | None, traits: dict[str, Any] | None = None
    ) -> list[FlagResult]:
        """Flags with reasons and variants as `kind` sees them; no identifier: the environment's flags."""
        evaluated = self.evaluated
        if identifier is None:
            return visible_results(evaluated.results, *evaluated.kinds[kind])
        if self.compiled is not None:
            try:
                return self.compiled.results(kind, identifier, traits or {})
            except NeedsEngine:
                _request_fallback()
        try:
            results = evaluate_results(evaluated.mapped, evaluated.features, identifier, traits)
        except ENGINE_ERRORS as exc:
            raise TraitsUnevaluable(exc) from None
        return visible_results(results, *evaluated.kinds[kind])


def _request_fallback() -> None:
    # Traits the engine raises on or coerces unusually (a number too long for float()): rare and
    # client-driven, so counted but not logged.
    metrics.EVALUATOR_FALLBACKS.labels(reason="unusual_trait", scope="request").inc()


def build_evaluator(state: EnvironmentState) -> Evaluator:
    started = time.perf_counter()
    evaluator = Evaluator(state.client_key, state.document_bytes())
    metrics.STATE_BUILD_SECONDS.observe(time.perf_counter() - started)
    return evaluator


class Evaluators:
    """A worker's evaluators: built on first need, off the event loop, the most recently used kept."""

    def __init__(self, max_size: int, on_built: Callable[[], None] = lambda: None) -> None:
        self.max_size = max_size
        self._on_built = on_built  # after an evaluator built on demand is kept (the worker: gc.freeze)
        self._kept: OrderedDict[EnvironmentState, None] = OrderedDict()  # least recently used first
        self._building: dict[EnvironmentState, asyncio.Future[Evaluator]] = {}
        self.built = 0  # evaluators built since start (metrics, tests)

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, state: EnvironmentState) -> bool:
        return state in self._kept

    async def ready(self, state: EnvironmentState) -> None:
        """Return once `state` has its evaluator; concurrent callers share one build."""
        if state.evaluator is not None:
            self.touch(state)
            return
        building = self._building.get(state)
        if building is None:
            building = asyncio.get_running_loop().run_in_executor(None, build_evaluator, state)
            self._building[state] = building
            building.add_done_callback(lambda done: self._finished(state, done))
        # shielded: a caller that goes away does not cancel the build the others wait for
        await asyncio.shield(building)

    def touch(self, state: EnvironmentState) -> None:
        """`state`'s evaluator was used: it is the most recently used."""
        if state in self._kept:
            self._kept.move_to_end(state)

    def _finished(self, state: EnvironmentState, done: asyncio.Future[Evaluator]) -> None:
        self._building.pop(state, None)
        if not done.cancelled() and done.exception() is None:
            self.keep(state, done.result())
            self._on_built()

    def keep(self, state: EnvironmentState, evaluator: Evaluator) -> None:
        """Give `state` its evaluator and keep it, dropping the least recently used beyond the bound."""
        state.evaluator = evaluator
        self.built += 1
        self._kept[state] = None
        self._kept.move_to_end(state)
        while len(self._kept) > self.max_size:
            dropped, _ = self._kept.popitem(last=False)
            dropped.evaluator = None

    def forget(self, state: EnvironmentState) -> None:
        """`state` was replaced or removed: its evaluator goes (in-flight requests holding it finish with it)."""
        if state in self._kept:
            del self._kept[state]
            state.evaluator = None

    def wanted(self, client_key: str, states: dict[str, EnvironmentState]) -> bool:
        """Is the environment's current evaluator kept (so a new document's evaluator is built ahead of time)?"""
        current = states.get(client_key)
        return current is not None and current in self._kept
