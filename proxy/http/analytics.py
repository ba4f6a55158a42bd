"""Flag analytics: SDKs `POST /api/v1/analytics/flags/` `{feature_name: count}` to the proxy (both peers
answer 404, so the counts were lost). Workers add them up in memory and hand them to the leader through
the shared-memory area (one small file per worker flush); the leader sums them and forwards them to
`{api_url}/analytics/flags/` with the environment's server key.

What a client sends is bounded before it is kept: counts are integers in [0, MAX_COUNT] (a real SDK sends
its evaluations since its last flush, seconds apart), at most MAX_NAMES names per request, and only names
of features the environment has are counted (others are ignored and counted as rejected), so neither a
buffer nor a hand-over file can be grown with invented names or overflow 64 bits.
"""

from __future__ import annotations

from collections.abc import Container

import orjson

from proxy.http.errors import BadRequest, RequestInvalid

MAX_COUNT = 2**31 - 1
MAX_NAMES = 1000


def parse_analytics_body(raw: bytes, known: Container[str]) -> tuple[dict[str, int], int]:
    """→ (counts of known features, number of names ignored). Raises RequestInvalid (422) or BadRequest."""
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
    if len(data) > MAX_NAMES:
        raise BadRequest(f"at most {MAX_NAMES} feature names per analytics request, got {len(data)}")
    errors = [
        {"type": "int_type", "loc": ["body", name], "msg": "Input should be a non-negative integer", "input": count}
        for name, count in data.items()
        if not isinstance(count, int) or isinstance(count, bool) or count < 0
    ]
    if errors:
        raise RequestInvalid(errors)
    too_large = next((name for name, count in data.items() if count > MAX_COUNT), None)
    if too_large is not None:
        raise BadRequest(
            f"count for '{too_large[:100]}' exceeds {MAX_COUNT}; SDKs report counts since their last flush"
        )
    counts = {name: count for name, count in data.items() if name in known}
    return counts, len(data) - len(counts)
