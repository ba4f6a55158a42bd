"""The possible results of one feature, built and encoded once per environment state.

A feature evaluates to its default, one of its segment overrides, an identity override, or, when the
chosen feature context has variants, one of its variant bands or "control". Each of those is an
`Outcome` carrying its flag-engine reason and variant and its pre-encoded response fragment, so an
evaluation only picks outcomes and a response is a join of their bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import orjson

from proxy.evaluation.conditions import hashed_percentage
from proxy.evaluation.engine import FlagResult


@dataclass(frozen=True, slots=True)
class Outcome:
    result: FlagResult  # built once, shared by every request that lands here
    enabled: bool  # result.enabled, one attribute closer for the hide-disabled filter
    fragment: bytes  # the flag as the response encodes it: {"feature", "enabled", "feature_state_value"}
    # True when the reason is the engine's fallback (DEFAULT or STATIC): an identity's own override
    # segment makes its features "targeted", which turns STATIC into DEFAULT for that identity.
    fallback: bool

    @property
    def name(self) -> str:
        name: str = self.result.feature["name"]
        return name


def outcome(feature: dict[str, Any], enabled: bool, value: Any, reason: str, variant: str | None) -> Outcome:
    fragment = orjson.dumps({"feature": feature, "enabled": enabled, "feature_state_value": value})
    result = FlagResult(feature, enabled, value, reason, variant)
    return Outcome(result, enabled, fragment, reason in ("DEFAULT", "STATIC"))


class Split:
    """A feature context with variants: the identity's hash picks a band, else control (engine §5)."""

    __slots__ = ("bands", "control", "prefix")

    def __init__(self, prefix: bytes, bands: tuple[tuple[float, float, Outcome], ...], control: Outcome) -> None:
        self.prefix = prefix  # b"<feature context key>," : the hashed ids are [context key, identity key]
        self.bands = bands
        self.control = control

    def pick(self, identity_key: bytes) -> Outcome:
        percentage = hashed_percentage(self.prefix + identity_key)
        for start, limit, band in self.bands:
            if start <= percentage < limit:
                return band
        return self.control


Choice = Outcome | Split


def choice_for(feature: dict[str, Any], context: dict[str, Any], reason: str) -> Choice:
    """The outcome(s) of one feature context (the environment's, or a segment override's)."""
    enabled, value = context["enabled"], context["value"]
    variants = context.get("variants")
    if not variants:
        return outcome(feature, enabled, value, reason, None)
    return Split(
        f"{context['key']},".encode(),
        tuple(_bands(feature, enabled, variants)),
        outcome(feature, enabled, value, reason, "control"),
    )


def _bands(
    feature: dict[str, Any], enabled: bool, variants: Iterable[dict[str, Any]]
) -> Iterable[tuple[float, float, Outcome]]:
    # The engine walks variants by priority (a stable sort) accumulating float limits; the same
    # arithmetic here gives the same band edges.
    start = 0.0
    for variant in sorted(variants, key=itemgetter("priority")):
        weight = variant["weight"]
        limit = weight + start
        yield start, limit, outcome(feature, enabled, variant["value"], f"SPLIT; weight={weight}", variant.get("key"))
        start = limit
