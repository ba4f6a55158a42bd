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
