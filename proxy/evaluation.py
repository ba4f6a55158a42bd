"""Flag evaluation and response shaping: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flag_engine.engine import get_evaluation_result

from proxy.mapping import MappedEnvironment, identity_context

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
    visible: frozenset[str] | None,
    identifier: str | None = None,
    traits: Mapping[str, Any] | None = None,
) -> list[Flag]:
    """Evaluate the environment (no identifier) or one identity; keep the document's flag order.

    `visible` is the set of flag names the key kind may see before the enabled filter; None means all.
    """
    context = mapped.context if identifier is None else identity_context(mapped, identifier, traits or {})
    result = get_evaluation_result(context)["flags"]
    return shape_flags(result.values(), features, visible)


def shape_flags(
    results: Iterable[Mapping[str, Any]],
    features: Mapping[str, dict[str, Any]],
    visible: frozenset[str] | None,
) -> list[Flag]:
    return [
        {"feature": features[r["name"]], "enabled": r["enabled"], "feature_state_value": r["value"]}
        for r in results
        if visible is None or r["name"] in visible
    ]


def drop_disabled(flags: list[Flag]) -> list[Flag]:
    return [flag for flag in flags if flag["enabled"]]
