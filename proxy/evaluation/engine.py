"""Flag evaluation and response shaping: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flag_engine.engine import get_evaluation_result

from proxy.evaluation.mapping import MappedEnvironment, identity_context
from proxy.evaluation.safe_regex import install_in_flag_engine

# flag-engine would run `re` on client-supplied traits on this thread (a catastrophic pattern hangs the
# worker): wherever the proxy hands work to the engine, its REGEX conditions use the safe matcher.
install_in_flag_engine()

# A flag as the Python proxy renders it: feature{id,name,type}, enabled, feature_state_value.
Flag = dict[str, Any]


def feature_objects(mapped: MappedEnvironment) -> dict[str, dict[str, Any]]:
    """name → the shared `feature` sub-object, built once per environment."""
    return {
        name: {
            "id": feature["metadata"]["id"],
            "name": name,
            "type": mapped.feature_types.get(feature["metadata"]["id"], "STANDARD"),
        }
        for name, feature in mapped.context["features"].items()
    }


def evaluate(
    mapped: MappedEnvironment,
    features: Mapping[str, dict[str, Any]],
    identifier: str | None = None,
    traits: Mapping[str, Any] | None = None,
) -> list[Flag]:
    """Evaluate the environment (no identifier) or one identity; keep the document's flag order."""
    return as_flags(evaluate_results(mapped, features, identifier, traits))


@dataclass(frozen=True, slots=True)
class FlagResult:
    """One evaluated flag with what OpenFeature-style clients need besides enabled and value.

    `reason` is flag-engine 11's reason string (`DEFAULT`, `STATIC`, `TARGETING_MATCH; segment=<name>`,
    `SPLIT; weight=<w>`); `variant` its variant (None, `"control"` or a variant key).
    """

    feature: dict[str, Any]  # the shared {id, name, type} object
    enabled: bool
    value: Any
    reason: str
    variant: str | None


def as_flags(results: list[FlagResult]) -> list[Flag]:
    """Results as the Python proxy renders flags (reasons and variants dropped)."""
    return [{"feature": r.feature, "enabled": r.enabled, "feature_state_value": r.value} for r in results]


def evaluate_results(
    mapped: MappedEnvironment,
    features: Mapping[str, dict[str, Any]],
    identifier: str | None = None,
    traits: Mapping[str, Any] | None = None,
) -> list[FlagResult]:
    """As `evaluate`, with reasons and variants; the document's flag order."""
    context = mapped.context if identifier is None else identity_context(mapped, identifier, traits or {})
    return [
        FlagResult(features[r["name"]], r["enabled"], r["value"], r["reason"], r.get("variant"))
        for r in get_evaluation_result(context)["flags"].values()
    ]


def visible_results(results: list[FlagResult], visible: frozenset[str] | None, hide_disabled: bool) -> list[FlagResult]:
    """`visible_to` for FlagResults."""
    return [
        r for r in results if (visible is None or r.feature["name"] in visible) and (r.enabled or not hide_disabled)
    ]


def visible_to(flags: list[Flag], visible: frozenset[str] | None, hide_disabled: bool) -> list[Flag]:
    """What one key kind sees: only `visible` names (None: all), and no disabled flag if `hide_disabled`."""
    return [
        flag
        for flag in flags
        if (visible is None or flag["feature"]["name"] in visible) and (flag["enabled"] or not hide_disabled)
    ]


# What flag-engine raises on trait values it cannot cast (a 320-digit number string against a MODULO or a
# numeric comparison: `int too large to convert to float`). Flagsmith's API answers 500; a client's
# input gets a 422 that says so here.
ENGINE_ERRORS = (OverflowError, ValueError, TypeError, RecursionError)
