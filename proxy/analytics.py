"""Flag analytics: SDKs `POST /api/v1/analytics/flags/` `{feature_name: count}` to the proxy (both peers
answer 404, so the counts were lost). Workers add them up in memory and hand them to the leader through
the shared-memory area (one small file per worker flush); the leader sums them and forwards them to
`{api_url}/analytics/flags/` with the environment's server key.
"""

from __future__ import annotations

import orjson

from proxy.identity_request import RequestInvalid

FOLDER = "analytics"  # the hand-over folder in the shared-memory area


def parse_analytics_body(raw: bytes) -> dict[str, int]:
    """`{feature_name: count}` with non-negative integer counts; raises RequestInvalid (422)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestInvalid(
            [{"type": "json_invalid", "loc": ["body", exc.pos], "msg": "JSON decode error", "input": {}}]
        ) from None
    if not isinstance(data, dict):
        raise RequestInvalid(
            [{"type": "dict_type", "loc": ["body"], "msg": "Input should be a valid dictionary", "input": data}]
        )
    errors = [
        {"type": "int_type", "loc": ["body", name], "msg": "Input should be a non-negative integer", "input": count}
        for name, count in data.items()
        if not isinstance(count, int) or isinstance(count, bool) or count < 0
    ]
    if errors:
        raise RequestInvalid(errors)
    return data
