"""Documents for benchmarks: the conformance environment, optionally grown with identity overrides."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).parents[1] / "tests" / "data" / "ep-examples"


def base_document() -> dict[str, Any]:
    return json.loads((EXAMPLES / "upstream_env1_document.json").read_text())


def with_overrides(count: int) -> dict[str, Any]:
    """env1 plus `count` identities, each overriding two features (distinct values: one segment each)."""
    document = base_document()
    features = document["feature_states"]
    document["identity_overrides"] = [
        {
            "identifier": f"override-user-{i}",
            "identity_uuid": str(uuid.UUID(int=i + 1)),
            "identity_features": [
                {
                    "feature": copy.deepcopy(features[i % len(features)]["feature"]),
                    "enabled": True,
                    "feature_state_value": f"value-{i}",
                    "featurestate_uuid": str(uuid.UUID(int=10**6 + i)),
                    "django_id": None,
                    "multivariate_feature_state_values": [],
                },
                {
                    "feature": copy.deepcopy(features[(i + 1) % len(features)]["feature"]),
                    "enabled": i % 2 == 0,
                    "feature_state_value": i,
                    "featurestate_uuid": str(uuid.UUID(int=2 * 10**6 + i)),
                    "django_id": None,
                    "multivariate_feature_state_values": [],
                },
            ],
        }
        for i in range(count)
    ]
    return document


def about_one_megabyte() -> dict[str, Any]:
    return with_overrides(1800)


# The heavy profile: like Flagsmith's own load test of the Python proxy (50 features, 15 segments that
# each override every feature: 750 segment overrides), with 5 rules x 3 conditions per segment.
# Its api_key is env1's, so the proxy serves it under the conformance keys.
HEAVY_TRAITS = {"plan": "premium", "age": 30, "country": "GB"}  # what the random-identity POST sends
_PLANS = ["free", "starter", "premium", "enterprise"]
_COUNTRIES = ["GB", "US", "FR", "DE", "XX"]


def _heavy_rule(segment: int, rule: int) -> dict[str, Any]:
    """Rule 0 targets a plan and a minimum age, rule 2 a share of identities (so of 15 segments, 3 can match
    the posted traits, each for some identities); the others mix every operator, over the posted traits
    and ones the identity lacks."""
    n = segment + rule
    conditions = [
        [
            {"operator": "EQUAL", "property_": "plan", "value": _PLANS[segment % 4]},
            {"operator": "GREATER_THAN_INCLUSIVE", "property_": "age", "value": str(18 + segment)},
            {"operator": "IS_NOT_SET", "property_": "legacy_device", "value": None},
        ],
        [
            {"operator": "GREATER_THAN", "property_": "app_version", "value": f"{n % 4}.{n % 7}.0:semver"},
            {"operator": "REGEX", "property_": "email", "value": r".*@example\.(com|org)$"},
            {"operator": "IN", "property_": "country", "value": ",".join(_COUNTRIES[segment % 2 : segment % 2 + 3])},
        ],
        [
            {"operator": "LESS_THAN", "property_": "score", "value": str(50 + n)},
            {"operator": "PERCENTAGE_SPLIT", "property_": None, "value": str(30 + 4 * segment)},
            {"operator": "CONTAINS", "property_": "$.identity.identifier", "value": "bot"},
        ],
        [
            {"operator": "MODULO", "property_": "age", "value": f"{2 + n % 3}|0"},
            {"operator": "CONTAINS", "property_": "plan", "value": "prem"},
            {"operator": "NOT_EQUAL", "property_": "country", "value": "XX"},
        ],
        [
            {"operator": "LESS_THAN_INCLUSIVE", "property_": "age", "value": str(40 + n)},
            {"operator": "IN", "property_": "plan", "value": "premium,enterprise"},
            {"operator": "EQUAL", "property_": "beta", "value": "true"},
        ],
    ][rule % 5]
    return {"type": "ALL" if rule == 0 else "ANY", "conditions": conditions, "rules": []}


def heavy_document(features: int = 50, segments: int = 15, rules: int = 5) -> dict[str, Any]:
    document = base_document()
    document["identity_overrides"] = []
    states = []
    for f in range(features):
        feature = {"id": f + 1, "name": f"heavy_feature_{f}", "type": "MULTIVARIATE" if f % 10 == 0 else "STANDARD"}
        state = {
            "feature": feature,
            "enabled": f % 3 != 0,
            "django_id": 10_000 + f,
            "featurestate_uuid": str(uuid.UUID(int=10_000 + f)),
            "feature_segment": None,
            "feature_state_value": f"value-{f}",
            "multivariate_feature_state_values": [],
        }
        if feature["type"] == "MULTIVARIATE":
            state["multivariate_feature_state_values"] = [
                {
                    "id": 100 * f + v,
                    "multivariate_feature_option": {"id": 100 * f + v, "value": f"variant-{f}-{v}"},
                    "mv_fs_value_uuid": str(uuid.UUID(int=200_000 + 100 * f + v)),
                    "percentage_allocation": 25.0,
                }
                for v in range(3)
            ]
        states.append(state)
    document["feature_states"] = states
    document["project"]["server_key_only_feature_ids"] = []
    document["project"]["segments"] = [
        {
            "id": 1000 + s,
            "name": f"heavy_segment_{s}",
            "rules": [
                {
                    "type": "ALL",
                    "conditions": [],
                    "rules": [_heavy_rule(s, r) for r in range(rules)],
                }
            ],
            "feature_states": [
                {
                    **copy.deepcopy(state),
                    "django_id": 100_000 + s * features + f,
                    "featurestate_uuid": str(uuid.UUID(int=100_000 + s * features + f)),
                    # later segments win: finding the winner evaluates several segments first
                    "feature_segment": {"priority": segments - s},
                    "feature_state_value": f"segment-{s}-value-{f}",
                    "enabled": (s + f) % 2 == 0,
                }
                for f, state in enumerate(states)
            ],
        }
        for s in range(segments)
    ]
    return document


def small_environment(index: int) -> dict[str, Any]:
    """About 7 KB, as a large organisation's typical environment: 10 features (one server-only), 2 segments,
    one identity override; distinct `id`, `api_key` and name per `index` (client key `client_<index>`)."""
    document = base_document()
    states = document["feature_states"][:10]
    kept = {state["feature"]["id"] for state in states}
    segments = [
        {**segment, "feature_states": [s for s in segment["feature_states"] if s["feature"]["id"] in kept]}
        for segment in document["project"]["segments"]
    ]
    document["project"]["segments"] = [segment for segment in segments if segment["feature_states"]][:2]
    document["project"]["server_key_only_feature_ids"] = [states[-1]["feature"]["id"]]
    for f, state in enumerate(states[2:4], start=2):  # two multivariate features, two options each
        state["feature"] = dict(state["feature"], type="MULTIVARIATE")
        state["multivariate_feature_state_values"] = [
            {
                "id": 100 * f + v,
                "multivariate_feature_option": {"id": 100 * f + v, "value": f"variant-{f}-{v}"},
                "mv_fs_value_uuid": str(uuid.UUID(int=300_000 + 100 * f + v)),
                "percentage_allocation": 30.0,
            }
            for v in range(2)
        ]
    document["feature_states"] = states
    document["identity_overrides"] = [
        {
            "identifier": f"override-user-{index}",
            "identity_uuid": str(uuid.UUID(int=index + 1)),
            "identity_features": [
                {**copy.deepcopy(state), "enabled": not state["enabled"], "multivariate_feature_state_values": []}
                for state in states[:3]
            ],
        }
    ]
    document.update(id=index + 1, api_key=f"client_{index}", name=f"Environment {index}")
    return document
