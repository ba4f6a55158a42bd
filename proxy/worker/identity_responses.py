"""Encoded identity responses, evaluated once per (key kind, identifier, traits) and kept in the LRU.

Owns the cache key and the encoding: the response depends on nothing but the key kind, the identifier and
the traits as echoed, so those are the key, each value as evaluation reads it (`traits_key`, which OFREP's
cache uses too). A body is stored plain until a client asks for gzip, then upgraded in place, so clients
that never ask never pay for compression.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy.area.bodies import GZIP_MIN_BYTES, Body, KeyKind
from proxy.worker.response_cache import ResponseCache
from proxy.worker.served import Served

TraitsKey = tuple[tuple[str, type, Any], ...]


def traits_key(traits: Iterable[tuple[str, Any]]) -> TraitsKey:
    """(name, value) pairs as a cache key that tells apart every two values evaluation can tell apart.

    Python's equality is too coarse: 1, 1.0 and True are equal (so the type is part of the key), and so
    are -0.0 and 0.0, which REGEX, PERCENTAGE_SPLIT and the echo read as "-0.0" and "0.0" (so a float is
    keyed by its repr, which also makes every NaN one key). Request JSON holds no other such pair: strings
    and ints are equal only when identical, and orjson reads integers past 64 bits as floats.
    """
    return tuple((name, type(value), repr(value) if type(value) is float else value) for name, value in traits)


class IdentityResponses:
    def __init__(self, cache: ResponseCache | None) -> None:
        self.cache = cache  # None: caching is off (endpoint_caches.identities.use_cache: false)

    def body(
        self,
        kind: KeyKind,
        state: Served,
        identifier: str,
        echo: list[dict[str, Any]],
        traits: dict[str, Any],
        gzip_wanted: bool,
    ) -> Body:
        cache = self.cache
        key = (kind, identifier, traits_key((t["trait_key"], t["trait_value"]) for t in echo))
        body = cache.get(state.client_key, key) if cache is not None else None
        if body is None:
            data = state.identity_body(kind, identifier, echo, traits)  # pre-encoded fragments, joined
            body = Body.of(data) if gzip_wanted else Body(data, None)
            if cache is not None:
                cache.put(state.client_key, key, body)
        elif gzip_wanted and body.gzip is None and len(body.plain) >= GZIP_MIN_BYTES:
            body = Body.of(body.plain)
            if cache is not None:  # always true here: the body came from it
                cache.put(state.client_key, key, body)
        return body
