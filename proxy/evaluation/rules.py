"""Segment rules compiled to predicates: ALL/ANY/NONE over conditions and sub-rules, as flag-engine 11.

A segment matches when it has rules and every top-level rule matches (whatever its type); a rule with
neither conditions nor sub-rules matches, even NONE; a rule with both ANDs the two groups, each
combined by the rule's type (engine-semantics.md §2).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy.evaluation.conditions import Facts, Predicate, Unsupported, compile_condition


def always(facts: Facts) -> bool:
    return True


def never(facts: Facts) -> bool:
    return False


# Rules are combined by plain `and`/`or` chains for the common small sizes, and a loop beyond: each
# costs about half of all()/any() over a generator per call. Predicates return real bools.


def _all(predicates: list[Predicate]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:
        a, b = predicates
        return lambda facts: a(facts) and b(facts)
    if len(predicates) == 3:
        a, b, c = predicates
        return lambda facts: a(facts) and b(facts) and c(facts)

    def check(facts: Facts) -> bool:
        for predicate in predicates:  # noqa: SIM110
            if not predicate(facts):
                return False
        return True

    return check


def _any(predicates: list[Predicate]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]
    if len(predicates) == 2:
        a, b = predicates
        return lambda facts: a(facts) or b(facts)
    if len(predicates) == 3:
        a, b, c = predicates
        return lambda facts: a(facts) or b(facts) or c(facts)

    def check(facts: Facts) -> bool:
        for predicate in predicates:  # noqa: SIM110
            if predicate(facts):
                return True
        return False

    return check


def _none(predicates: list[Predicate]) -> Predicate:
    matches_any = _any(predicates)
    return lambda facts: not matches_any(facts)


_COMBINE = {"ALL": _all, "ANY": _any, "NONE": _none}


def compile_rule(rule: dict[str, Any], segment_key: str) -> Predicate:
    conditions = rule.get("conditions") or []
    sub_rules = rule.get("rules") or []
    if not conditions and not sub_rules:
        return always  # whatever its type, even NONE (engine §2)
    combine = _COMBINE.get(rule["type"]) if isinstance(rule["type"], str) else None
    if combine is None:
        raise Unsupported("raises", "environment", f"rule type {rule['type']!r}")
    # Conditions and sub-rules are two groups, each combined by the rule's type, then ANDed. Nothing
    # here raises or has side effects, so short-circuiting between the groups changes no answer.
    groups = []
    if conditions:
        groups.append(combine([compile_condition(condition, segment_key) for condition in conditions]))
    if sub_rules:
        groups.append(combine([compile_rule(sub_rule, segment_key) for sub_rule in sub_rules]))
    return _all(groups)


def compile_segment(segment: dict[str, Any]) -> Predicate:
    rules = segment["rules"]
    if not rules:
        return never  # a segment without rules never matches
    return _all([compile_rule(rule, segment["key"]) for rule in rules])


def raise_environment_scoped(rules: Iterable[dict[str, Any]], segment_key: str) -> None:
    """Compiling stops at the first problem; before one segment goes to flag-engine on its own, make
    sure nothing else in it needs the whole environment there (a `$.flags` read, a raising value)."""
    for rule in rules:
        kind = rule["type"]
        if (rule.get("conditions") or rule.get("rules")) and not (isinstance(kind, str) and kind in _COMBINE):
            raise Unsupported("raises", "environment", f"rule type {kind!r}")
        for condition in rule.get("conditions") or ():
            try:
                compile_condition(condition, segment_key)
            except Unsupported as exc:
                if exc.scope != "segment":
                    raise
        raise_environment_scoped(rule.get("rules") or (), segment_key)


def conditions_of(rules: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for rule in rules:
        yield from rule.get("conditions") or ()
        yield from conditions_of(rule.get("rules") or ())
