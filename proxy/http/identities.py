"""The one identity-response pipeline, shared by `/api/v1/identities/` (GET, POST) and OFREP.

A POST is: resolve the key (401/503 before any body is read), read the body, resolve again (a new state may
have been swapped in meanwhile), then answer. Answers are kept in the worker's LRU
(proxy/worker/response_cache.py) under two keys:

* the request body as sent, with the key kind and the route's tag: an SDK re-sending the same identity pays
  a hash lookup, and no JSON is parsed;
* the parsed request (`Parsed.key`): the key kind, the identifier and the traits, each value as evaluation
  reads it (`traits_key`), so requests that differ only in spelling share an answer.

Bodies are made at their size by whoever encodes them (`Served.identity_body`, `encode_evaluation`: joins
and copies, never orjson's over-allocated output), so the cache keeps them without copying. A body is
stored plain until a client asks for gzip, then upgraded in place, so clients that never ask never
pay for compression. Hits and misses are counted once per request. Usage (with a proxy_key) is counted by
the routes, through `count`, once an answer is an answer.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any

from proxy.area.bodies import GZIP_MIN_BYTES, Body, KeyKind
from proxy.area.mailboxes import CountsBuffer
from proxy.http.exchange import Call
from proxy.http.identity_request import parse_identity_body
from proxy.http.request_body import BodyReader
from proxy.worker.response_cache import key_cost
from proxy.worker.served import Served
from proxy.worker.store import Store

RAW_KEY_BYTES = 33 + 64  # beyond the body's length: the bytes object's header and the (tag, kind, body) tuple


class Parsed:
    """A parsed request: what its answer is cached under, and how it is evaluated."""

    __slots__ = ("identifier", "key", "key_bytes")

    identifier: str | None
    key: Hashable
    key_bytes: int

    def encode(self, state: Served, kind: KeyKind) -> Body:
        raise NotImplementedError


class IdentityRequest(Parsed):
    """`/api/v1/identities/`: keyed by (kind, identifier, traits as echoed, in request order)."""

    __slots__ = ("echo", "traits")

    def __init__(self, kind: KeyKind, identifier: str, echo: list[dict[str, Any]], traits: dict[str, Any], size: int):
        self.identifier = identifier
        self.echo = echo
        self.traits = traits
        self.key = identity_key(kind, identifier, echo)
        self.key_bytes = key_cost(size, len(echo))

    def encode(self, state: Served, kind: KeyKind) -> Body:
        return Body(state.identity_body(kind, self.identifier or "", self.echo, self.traits), None)


def identity_key(kind: KeyKind, identifier: str, echo: list[dict[str, Any]]) -> Hashable:
    return (kind, identifier, traits_key((t["trait_key"], t["trait_value"]) for t in echo))


TraitsKey = tuple[tuple[str, type, Any], ...]


def traits_key(traits: Iterable[tuple[str, Any]]) -> TraitsKey:
    """(name, value) pairs as a cache key that tells apart every two values evaluation can tell apart.

    Python's equality is too coarse: 1, 1.0 and True are equal (so the type is part of the key), and so
    are -0.0 and 0.0, which REGEX, PERCENTAGE_SPLIT and the echo read as "-0.0" and "0.0" (so a float is
    keyed by its repr, which also makes every NaN one key). Request JSON holds no other such pair: strings
    and ints are equal only when identical, and orjson reads integers past 64 bits as floats.
    """
    return tuple((name, type(value), repr(value) if type(value) is float else value) for name, value in traits)


Parser = Callable[[KeyKind, bytes, Call], Parsed]


def parse_identity(kind: KeyKind, raw: bytes, call: Call) -> Parsed:
    identifier, echo, traits = parse_identity_body(raw, call.header(b"content-type"))
    return IdentityRequest(kind, identifier, echo, traits, len(raw))


class IdentityPipeline:
    def __init__(self, store: Store, body_reader: BodyReader) -> None:
        self.store = store
        self.cache = store.cache  # None: caching is off (endpoint_caches.identities.use_cache: false)
        self.read = body_reader.read
        self.usage: CountsBuffer | None = store.counters.usage

    async def post(
        self, call: Call, key: bytes | None, tag: str, parse: Parser, gzip_wanted: bool, by_bytes: bool = True
    ) -> tuple[Served, Body]:
        """A POSTed identity's answer: from the cache by the body's bytes (unless `by_bytes` is false: a
        request the parser would refuse whatever its body), else parsed and answered."""
        resolve = self.store.resolve
        resolve(key)  # 401/503 before reading a body
        raw = await self.read(call)
        kind, state = resolve(key)  # again: a new state may have been swapped in while the body was read
        cache = self.cache
        if cache is None or not by_bytes:
            return state, await self.answer(kind, state, parse(kind, raw, call), gzip_wanted)
        raw_key = (tag, kind, raw)
        body = cache.get(state.client_key, raw_key)
        if body is not None:
            cache.hits += 1
            return state, self._upgraded(state, raw_key, body, gzip_wanted, len(raw) + RAW_KEY_BYTES)
        body = await self.answer(kind, state, parse(kind, raw, call), gzip_wanted)
        cache.put(state.client_key, raw_key, body, len(raw) + RAW_KEY_BYTES, exact=True)
        return state, body

    async def answer(self, kind: KeyKind, state: Served, parsed: Parsed, gzip_wanted: bool) -> Body:
        """A parsed request's answer: from the cache by its parsed key, else evaluated and kept."""
        cache = self.cache
        if cache is not None:
            body = cache.get(state.client_key, parsed.key)
            if body is not None:
                cache.hits += 1
                return self._upgraded(state, parsed.key, body, gzip_wanted, parsed.key_bytes)
            cache.misses += 1
        await state.ready_for_identities()
        body = parsed.encode(state, kind)
        if gzip_wanted and len(body.plain) >= GZIP_MIN_BYTES:
            body = body.compressed()
        if cache is not None:
            cache.put(state.client_key, parsed.key, body, parsed.key_bytes, exact=True)
        return body

    def _upgraded(self, state: Served, key: Hashable, body: Body, gzip_wanted: bool, key_bytes: int) -> Body:
        if gzip_wanted and body.gzip is None and len(body.plain) >= GZIP_MIN_BYTES:
            body = body.compressed()
            if self.cache is not None:  # always true here: the body came from it
                self.cache.put(state.client_key, key, body, key_bytes, exact=True)
        return body

    def count(self, state: Served, resource: str) -> None:
        """Usage reporting (with a proxy_key): successful answers per environment and Flagsmith resource."""
        if self.usage is not None:
            self.usage.increment(state.client_key, resource)
