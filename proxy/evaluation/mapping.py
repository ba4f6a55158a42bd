"""Environment document → flag-engine evaluation context, mapped once per document.

Written to match what the official SDK mapper plus the engine produce (checked differentially in
tests/differential/test_mapping_differential.py), with one structural difference: identity overrides are not turned
into one synthetic segment per distinct override set. They are indexed by identifier instead, and an
identity's evaluation adds only its own override segment, so its cost does not grow with the number of
overrides in the document.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from flag_engine.context.types import (
    EvaluationContext,
    FeatureContext,
    FeatureValue,
    IdentityContext,
    SegmentContext,
    SegmentRule,
)

IDENTITY_OVERRIDE_SEGMENT_KEY = "identity_overrides"


class DocumentError(ValueError):
    """The document lacks something the engine needs; the previous good state is kept."""


class OverrideIndex:
    """identifier → that identity's override segment, built on first use and kept.

    Indexing is a single pass over the raw entries, so building a state for a document with thousands of
    overrides stays cheap; an identity's segment is mapped only when that identity is evaluated.
    """

    __slots__ = ("_built", "_raw")

    def __init__(self, overrides: list[dict[str, Any]]) -> None:
        self._raw: dict[str, list[list[dict[str, Any]]]] = {}
        for override in overrides:
            if states := override.get("identity_features"):
                self._raw.setdefault(override["identifier"], []).append(states)
        self._built: dict[str, SegmentContext[Any, Any]] = {}

    def __len__(self) -> int:
        return len(self._raw)

    def get(self, identifier: str) -> SegmentContext[Any, Any] | None:
        segment = self._built.get(identifier)
        if segment is None and identifier in self._raw:
            segment = self._built[identifier] = _override_segment(identifier, self._raw[identifier])
        return segment


@dataclass(frozen=True, slots=True)
class MappedEnvironment:
    context: EvaluationContext[Any, Any]
    override_segments: OverrideIndex
    # feature id → feature type ("STANDARD" / "MULTIVARIATE"), from the top-level feature states
    feature_types: dict[int, str]


def validate_document(document: Any) -> None:
    """Raise DocumentError naming the first missing or mistyped field the mapping relies on."""
    if not isinstance(document, dict):
        raise DocumentError(f"document is a JSON {type(document).__name__}, not an object")
    _require(document, "api_key", str, "document")
    _require(document, "feature_states", list, "document")
    project = _require(document, "project", dict, "document")
    _require(project, "segments", list, "project")
    for index, state in enumerate(document["feature_states"]):
        _check_feature_state(state, f"feature_states.{index}")
    for index, segment in enumerate(project["segments"]):
        where = f"project.segments.{index}"
        if not isinstance(segment, dict):
            raise DocumentError(f"{where} is not an object")
        _require(segment, "id", int, where)
        _require(segment, "rules", list, where)
        for fs_index, state in enumerate(segment.get("feature_states") or []):
            _check_feature_state(state, f"{where}.feature_states.{fs_index}")
    overrides = document.get("identity_overrides") or []
    if not isinstance(overrides, list):
        raise DocumentError("identity_overrides is not a list")
    for index, override in enumerate(overrides):
        where = f"identity_overrides.{index}"
        if not isinstance(override, dict):
            raise DocumentError(f"{where} is not an object")
        _require(override, "identifier", str, where)
        for fs_index, state in enumerate(override.get("identity_features") or []):
            _check_feature_state(state, f"{where}.identity_features.{fs_index}")


def _require(obj: dict[str, Any], field: str, kind: type, where: str) -> Any:
    value = obj.get(field)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DocumentError(f"{where}.{field} is missing or not a {kind.__name__}")
    return value


def _check_feature_state(state: Any, where: str) -> None:
    if not isinstance(state, dict):
        raise DocumentError(f"{where} is not an object")
    feature = _require(state, "feature", dict, where)
    _require(feature, "id", int, f"{where}.feature")
    _require(feature, "name", str, f"{where}.feature")
    _require(state, "enabled", bool, where)
    if not (state.get("django_id") or state.get("featurestate_uuid")):
        raise DocumentError(f"{where} has neither django_id nor featurestate_uuid")


def map_document(document: dict[str, Any]) -> MappedEnvironment:
    validate_document(document)
    project = document["project"]
    features: dict[str, FeatureContext[Any]] = {}
    feature_types: dict[int, str] = {}
    for state in document["feature_states"]:
        feature = state["feature"]
        # A repeated name: the later state wins and keeps the earlier position (dict semantics).
        features[feature["name"]] = _feature_context(state)
        feature_types[feature["id"]] = feature.get("type") or "STANDARD"
    segments: dict[str, SegmentContext[Any, Any]] = {}
    for segment in project["segments"]:
        key = str(segment["id"])
        segments[key] = {
            "key": key,
            "name": segment.get("name") or "",
            "rules": _rules(segment["rules"]),
            "overrides": [_feature_context(state) for state in segment.get("feature_states") or []],
            "metadata": {"id": segment["id"], "source": "api"},
        }
    context: EvaluationContext[Any, Any] = {
        "environment": {"key": document["api_key"], "name": document.get("name") or ""},
        "features": features,
        "segments": segments,
    }
    return MappedEnvironment(
        context=context,
        override_segments=OverrideIndex(document.get("identity_overrides") or []),
        feature_types=feature_types,
    )


def identity_context(
    mapped: MappedEnvironment, identifier: str, traits: Mapping[str, Any]
) -> EvaluationContext[Any, Any]:
    """The context for one identity: the base context plus, at most, its own override segment."""
    context = mapped.context
    # the caller's traits as they are (no copy per request): values are the JSON scalars the engine takes
    identity = cast("IdentityContext", {"identifier": identifier, "traits": traits})
    override = mapped.override_segments.get(identifier)
    if override is None:
        return {**context, "identity": identity}
    return {
        **context,
        "identity": identity,
        "segments": {**context["segments"], IDENTITY_OVERRIDE_SEGMENT_KEY: override},
    }


def _feature_context(state: dict[str, Any]) -> FeatureContext[Any]:
    feature = state["feature"]
    context: FeatureContext[Any] = {
        "key": str(state.get("django_id") or state["featurestate_uuid"]),
        "name": feature["name"],
        "enabled": state["enabled"],
        "value": state.get("feature_state_value"),
        "metadata": {"id": feature["id"]},
    }
    if mv_values := state.get("multivariate_feature_state_values"):
        variants = []
        for mv in mv_values:
            option = mv["multivariate_feature_option"]
            variant: FeatureValue = {
                "value": option.get("value"),
                "weight": mv["percentage_allocation"],
                # Variants are walked in id order; ids missing on legacy data fall back to the uuid's integer.
                "priority": mv.get("id") or uuid.UUID(mv["mv_fs_value_uuid"]).int,
            }
            if (key := option.get("key")) is not None:
                variant["key"] = key
            variants.append(variant)
        context["variants"] = variants
    # A segment override with a null priority is the weakest: leaving the key out means +inf to the engine.
    if (segment := state.get("feature_segment")) and segment.get("priority") is not None:
        context["priority"] = segment["priority"]
    return context


def _rules(rules: Iterable[dict[str, Any]]) -> list[SegmentRule]:
    return [
        {
            "type": rule["type"],
            "conditions": [
                {
                    "property": condition.get("property_") or "",
                    "operator": condition["operator"],
                    "value": condition.get("value"),
                }
                for condition in rule.get("conditions") or ()
            ],
            "rules": _rules(rule.get("rules") or ()),
        }
        for rule in rules
    ]


def _override_segment(identifier: str, entries: list[list[dict[str, Any]]]) -> SegmentContext[Any, Any]:
    features: dict[str, FeatureContext[Any]] = {}
    for states in entries:
        for state in sorted(states, key=lambda s: s["feature"]["name"]):
            name = state["feature"]["name"]
            # An identifier listed twice: its first entry wins, as the first synthetic segment does.
            features.setdefault(
                name,
                {
                    "key": "",
                    "name": name,
                    "enabled": state["enabled"],
                    "value": state.get("feature_state_value"),
                    "priority": float("-inf"),
                    "metadata": {"id": state["feature"]["id"]},
                },
            )
    return {
        "key": IDENTITY_OVERRIDE_SEGMENT_KEY,
        "name": "identity_overrides",
        "rules": [
            {
                "type": "ALL",
                "conditions": [{"property": "$.identity.identifier", "operator": "IN", "value": [identifier]}],
                "rules": [],
            }
        ],
        "overrides": list(features.values()),
        "metadata": {"source": "identity_overrides"},
    }
