"""An environment's segments and overrides compiled once, so an identity costs microseconds, not a rule walk.

flag-engine re-walks rule trees, re-reads traits through JSONPath and re-casts condition values on
every call (~150 µs on the conformance environment). Here, when a state is built:

* each segment becomes one predicate over the identity's facts (`rules.py`, `conditions.py`);
* each feature gets its candidate overrides in the order the engine's `_wins_over` would pick them
  (lowest priority first, ties in segment then override-list order), so the winner is the first
  candidate whose segment matches. Features with the same candidate segments share that search (a
  `Ladder`); segments are evaluated lazily, at most once per request;
* every possible result of a feature is an `Outcome` with its reason, variant and encoded bytes
  (proxy/evaluation/outcomes.py), and features no segment can change are fixed outright;
* identity overrides come from the mapping's `OverrideIndex`, turned into outcomes on first use.

flag-engine stays the reference: tests/differential/test_evaluator_differential.py compares the two on generated
documents. What this module cannot reproduce raises `Unsupported` (see proxy/evaluation/conditions.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, cast

import orjson
from flag_engine.segments.evaluator import is_context_in_segment

from proxy.evaluation.conditions import IDENTITY_KEY, Facts, Predicate, Unsupported, coerce, fact_key, path_resolver
from proxy.evaluation.engine import FlagResult
from proxy.evaluation.mapping import MappedEnvironment, identity_context
from proxy.evaluation.outcomes import Choice, Outcome, Split, choice_for, outcome
from proxy.evaluation.rules import compile_segment, conditions_of, never, raise_environment_scoped

# Facts key of the full engine context, present only when some segment is decided by flag-engine.
ENGINE_CONTEXT = ("engine", "context")
IDENTITY_OVERRIDE_REASON = "TARGETING_MATCH; segment=identity_overrides"

SegmentFallback = Callable[[str, str, str], None]  # (segment name, reason, detail): report it


def _engine_segment(segment: Any) -> Predicate:  # a SegmentContext, as the engine takes it
    return lambda facts: is_context_in_segment(facts[ENGINE_CONTEXT], segment)


# Per rung: the fixed outcomes to write at their flag positions, and the splits whose variant the
# identity's hash picks (an empty tuple when none: most rungs).
Rung = tuple[tuple[tuple[int, Outcome], ...], tuple[tuple[int, Split], ...]]


@dataclass(frozen=True, slots=True)
class Ladder:
    """Features whose candidates come from the same segments in the same order share one search.

    The first of `segments` that matches (the rung) decides every one of them; rung len(segments)
    means none matched. In the heavy profile, all 50 features share one ladder.
    """

    segments: tuple[int, ...]
    rungs: tuple[Rung, ...]


@dataclass(frozen=True, slots=True)
class KindPlan:
    """What one key kind evaluates: only the features it may see, in document order."""

    template: tuple[Outcome | None, ...]  # outcomes no identity changes; None where a ladder decides
    ladders: tuple[Ladder, ...]  # the one deciding the most features first
    # Per rung of the first ladder: the template with that rung's fixed outcomes already in place, so a
    # request copies one of these instead of writing them one by one (the heavy profile: 45 of 50 features).
    bases: tuple[tuple[Outcome | None, ...], ...]
    position: dict[str, int]  # feature name → index
    hide_disabled: bool


class CompiledEnvironment:
    def __init__(
        self,
        mapped: MappedEnvironment,
        features: dict[str, dict[str, Any]],
        kinds: Iterable[tuple[frozenset[str] | None, bool]],
        on_segment_fallback: SegmentFallback,
    ) -> None:
        self.mapped = mapped
        self.features = features
        context = mapped.context
        self.environment_key: str = context["environment"]["key"]
        segments = list((context.get("segments") or {}).values())
        self.uses_engine = False  # does some segment need the engine's context?
        reads: dict[Any, None] = {}  # facts keys the compiled conditions read, in first-read order
        self.predicates = [
            self._segment_predicate(cast(dict[str, Any], segment), on_segment_fallback, reads) for segment in segments
        ]
        self.needs_identity_key = IDENTITY_KEY in reads
        environment = context["environment"]
        self.paths = tuple(
            (read, path_resolver(read[1], cast(dict[str, Any], environment)))
            for read in reads
            if isinstance(read, tuple) and read[0] == "path"
        )
        choices = self._feature_choices(cast(dict[str, Any], context), cast(list[dict[str, Any]], segments), features)
        self.plans = tuple(self._plan(choices, visible, hide_disabled) for visible, hide_disabled in kinds)
        self._identity_overrides: dict[str, tuple[Outcome, ...]] = {}

    # -- building --------------------------------------------------------------------------------

    def _segment_predicate(
        self, segment: dict[str, Any], on_fallback: SegmentFallback, reads: dict[Any, None]
    ) -> Predicate:
        try:
            predicate = compile_segment(segment)
        except Unsupported as exc:
            if exc.scope != "segment":
                raise
            raise_environment_scoped(segment["rules"], segment["key"])
            on_fallback(segment["name"], exc.reason, exc.detail)
            self.uses_engine = True
            return _engine_segment(segment)
        for condition in conditions_of(segment["rules"]):
            reads.setdefault(fact_key(condition["property"], condition["operator"]))
        return predicate

    def _feature_choices(
        self, context: dict[str, Any], segments: list[dict[str, Any]], features: dict[str, dict[str, Any]]
    ) -> dict[str, tuple[tuple[tuple[int, Choice], ...], Choice]]:
        """name → (candidates in winning order, default choice)."""
        targeted = {override["name"] for segment in segments for override in segment.get("overrides") or ()}
        ranked: dict[str, list[tuple[Any, int, int, Choice]]] = {}
        order = 0
        for index, segment in enumerate(segments):
            for override in segment.get("overrides") or ():
                name = override["name"]
                priority = _priority(override)
                if name not in features or self.predicates[index] is never:
                    continue  # dropped by the engine, or can never match
                reason = f"TARGETING_MATCH; segment={segment['name']}"
                choice = choice_for(features[name], override, reason)
                ranked.setdefault(name, []).append((priority, order, index, choice))
                order += 1
        choices = {}
        for name, feature_context in context["features"].items():
            default = choice_for(features[name], feature_context, "DEFAULT" if name in targeted else "STATIC")
            candidates = sorted(ranked.get(name, ()), key=lambda c: (c[0], c[1]))
            choices[name] = (tuple((index, choice) for _, _, index, choice in candidates), default)
        return choices

    @staticmethod
    def _plan(
        choices: dict[str, tuple[tuple[tuple[int, Choice], ...], Choice]],
        visible: frozenset[str] | None,
        hide_disabled: bool,
    ) -> KindPlan:
        names = [name for name in choices if visible is None or name in visible]
        template: list[Outcome | None] = []
        # segment order → per rung, [(position, choice)]
        rungs: dict[tuple[int, ...], list[list[tuple[int, Choice]]]] = {}
        for index, name in enumerate(names):
            candidates, default = choices[name]
            if not candidates and isinstance(default, Outcome):
                template.append(default)
                continue
            template.append(None)
            order = tuple(segment for segment, _ in candidates)
            per_rung = rungs.setdefault(order, [[] for _ in range(len(order) + 1)])
            for rung, choice in enumerate([*(choice for _, choice in candidates), default]):
                per_rung[rung].append((index, choice))
        ladders = tuple(
            Ladder(
                order,
                tuple(
                    (
                        tuple((i, c) for i, c in rung if isinstance(c, Outcome)),
                        tuple((i, c) for i, c in rung if isinstance(c, Split)),
                    )
                    for rung in per_rung
                ),
            )
            for order, per_rung in rungs.items()
        )
        ladders = tuple(sorted(ladders, key=lambda ladder: -sum(len(fixed) for fixed, _ in ladder.rungs)))
        bases = tuple(_applied(template, fixed) for fixed, _ in ladders[0].rungs) if ladders else ()
        return KindPlan(tuple(template), ladders, bases, {name: i for i, name in enumerate(names)}, hide_disabled)

    # -- evaluating ------------------------------------------------------------------------------

    def facts(self, identifier: str, key: str, key_bytes: bytes, traits: dict[str, Any]) -> Facts:
        facts: Facts = {name: coerce(value) for name, value in traits.items()}
        if self.needs_identity_key:
            facts[IDENTITY_KEY] = key_bytes
        for fact, resolve in self.paths:
            facts[fact] = resolve(facts, identifier, key, traits)
        if self.uses_engine:
            engine_context = identity_context(self.mapped, identifier, traits)
            identity = engine_context["identity"]
            assert identity is not None  # identity_context always sets it
            identity["key"] = key
            facts[ENGINE_CONTEXT] = engine_context
        return facts

    def outcomes(self, kind: int, identifier: str, traits: dict[str, Any]) -> tuple[list[Outcome], frozenset[str]]:
        """The kind's outcomes in flag order (before hide-disabled), and the names whose STATIC reason
        this identity's unapplied override segment turns into DEFAULT."""
        plan = self.plans[kind]
        key = f"{self.environment_key}_{identifier}"
        key_bytes = key.encode()
        facts = self.facts(identifier, key, key_bytes, traits)
        outcomes: list[Any] | None = None
        predicates = self.predicates
        matched: list[bool | None] = [None] * len(predicates)
        for ladder in plan.ladders:
            segments = ladder.segments
            rung = len(segments)
            for step, segment in enumerate(segments):
                verdict = matched[segment]
                if verdict is None:
                    verdict = matched[segment] = predicates[segment](facts)
                if verdict:
                    rung = step
                    break
            fixed, splits = ladder.rungs[rung]
            if outcomes is None:  # the first ladder: its fixed outcomes are in its rung's base
                outcomes = list(plan.bases[rung])
            else:
                for index, chosen in fixed:
                    outcomes[index] = chosen
            if splits:
                for index, split in splits:
                    outcomes[index] = split.pick(key_bytes)
        if outcomes is None:  # no ladder: nothing an identity changes
            outcomes = list(plan.template)
        demoted: frozenset[str] = frozenset()
        if (overrides := self._overrides_of(identifier)) is not None:
            if _override_applies(facts, identifier):
                for override in overrides:
                    if (position := plan.position.get(override.name)) is not None:
                        outcomes[position] = override
            else:
                demoted = frozenset(override.name for override in overrides)
        return outcomes, demoted

    def _overrides_of(self, identifier: str) -> tuple[Outcome, ...] | None:
        """This identity's override outcomes (from the override index), built on first use and kept."""
        cached = self._identity_overrides.get(identifier)
        if cached is None:
            segment = self.mapped.override_segments.get(identifier)
            if segment is None:
                return None
            features = self.features
            cached = self._identity_overrides[identifier] = tuple(
                outcome(features[o["name"]], o["enabled"], o["value"], IDENTITY_OVERRIDE_REASON, None)
                for o in segment["overrides"]
                if o["name"] in features
            )
        return cached

    def body(self, kind: int, identifier: str, echo: list[dict[str, Any]], traits: dict[str, Any]) -> bytes:
        """The identity response, byte for byte what orjson.dumps of today's dict gives."""
        outcomes, _ = self.outcomes(kind, identifier, traits)
        if self.plans[kind].hide_disabled:
            fragments = [o.fragment for o in outcomes if o.enabled]
        else:
            fragments = [o.fragment for o in outcomes]
        return b"".join(
            (
                b'{"identifier":',
                orjson.dumps(identifier),
                b',"traits":',
                orjson.dumps(echo),
                b',"flags":[',
                b",".join(fragments),
                b"]}",
            )
        )

    def results(self, kind: int, identifier: str, traits: dict[str, Any]) -> list[FlagResult]:
        outcomes, demoted = self.outcomes(kind, identifier, traits)
        if self.plans[kind].hide_disabled:
            outcomes = [o for o in outcomes if o.enabled]
        if not demoted:
            return [o.result for o in outcomes]
        return [replace(o.result, reason="DEFAULT") if o.fallback and o.name in demoted else o.result for o in outcomes]


def _applied(template: list[Outcome | None], fixed: tuple[tuple[int, Outcome], ...]) -> tuple[Outcome | None, ...]:
    base = list(template)
    for index, chosen in fixed:
        base[index] = chosen
    return tuple(base)


def _priority(override: dict[str, Any]) -> float:
    """An override's priority, checked: sorting by it must pick what the engine's strict `<` picks."""
    priority = override.get("priority", math.inf)
    if not isinstance(priority, int | float) or math.isnan(priority):
        raise Unsupported("invalid_priority", "environment", f"priority {priority!r}")
    if priority == -math.inf:  # would tie with identity overrides, which the engine sees last
        raise Unsupported("invalid_priority", "environment", "priority -inf")
    return priority


def _override_applies(facts: Facts, identifier: str) -> bool:
    """The identity's override segment: `$.identity.identifier IN [identifier]`, read as the engine reads
    it (a trait of that literal name first, then the coerced identifier: "007" becomes 7, "7" ≠ "007")."""
    found = facts.get("$.identity.identifier")
    if found is None:
        found = coerce(identifier)
    return (str(found) if type(found) is int else found) == identifier
