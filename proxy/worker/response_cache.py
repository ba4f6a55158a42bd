"""Per-worker LRU of encoded identity responses, bounded in entries and in bytes.

Keys start with the environment's client key, so when one environment changes only its entries are
dropped (`drop_environment`, run by the background loader, never on the request path). What an entry
costs is given by whoever puts it, from lengths and counts (`key_cost`): no object walks per request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import replace

from proxy.area.bodies import Body

# OrderedDict node, the Body object, the (client key, key) tuple, the key tuple and its hash slot (measured)
ENTRY_OVERHEAD = 300
# One trait in a parsed key: its (name, type, value) tuple and the name's and value's object headers. The
# characters themselves are counted by the caller (at most the request's length).
TRAIT_OVERHEAD = 170


def key_cost(characters: int, traits: int) -> int:
    """What a key's Python objects hold: `characters` of text (the identifier, trait names and values: at
    most the length of the request they were parsed from) and `traits` trait tuples."""
    return characters + traits * TRAIT_OVERHEAD


class ResponseCache:
    __slots__ = ("_data", "evictions", "hits", "max_bytes", "max_entries", "misses", "size_bytes")

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        # full key → (body, its cost): the cost is computed once, not again at eviction
        self._data: OrderedDict[tuple[str, Hashable], tuple[Body, int]] = OrderedDict()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size_bytes = 0
        # Answers served from the cache and answers evaluated, counted by the caller once per request
        # (a request may look under two keys).
        self.hits = 0
        self.misses = 0
        self.evictions = 0  # pushed out by the entry or byte bound (not by an environment change)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, client_key: str, key: Hashable) -> Body | None:
        full_key = (client_key, key)
        entry = self._data.get(full_key)
        if entry is None:
            return None
        self._data.move_to_end(full_key)
        return entry[0]

    def put(
        self, client_key: str, key: Hashable, body: Body, key_bytes: int | None = None, exact: bool = False
    ) -> None:
        """Keep `body` under `key`; `key_bytes`: what the key holds beyond the entry's fixed overhead (the
        request pipeline knows it from the request's length; without it, estimated from the key's shape).
        `exact`: the body's bytes were made at their size (a join, a copy), so they need no copy here."""
        full_key = (client_key, key)
        if not exact:
            # orjson's output keeps its growth buffer (measured: a 2 KB body held 8 KB): keep an exact copy.
            body = replace(body, plain=bytes(memoryview(body.plain)))
        cost = body.size() + (_shape_cost(key) if key_bytes is None else key_bytes) + ENTRY_OVERHEAD
        if cost > self.max_bytes:
            return
        data = self._data
        old = data.pop(full_key, None)
        if old is not None:
            self.size_bytes -= old[1]
        data[full_key] = (body, cost)
        self.size_bytes += cost
        while len(data) > self.max_entries or self.size_bytes > self.max_bytes:
            _, (_, evicted_cost) = data.popitem(last=False)
            self.size_bytes -= evicted_cost
            self.evictions += 1

    def drop_environment(self, client_key: str) -> int:
        stale = [key for key in self._data if key[0] == client_key]
        for key in stale:
            self.size_bytes -= self._data.pop(key)[1]
        return len(stale)

    def clear(self) -> None:
        self._data.clear()
        self.size_bytes = 0


def _shape_cost(key: Hashable) -> int:
    """A parsed key's cost from its shape: (..., identifier, traits) → identifier length, trait count."""
    if isinstance(key, tuple) and len(key) >= 2 and isinstance(key[-1], tuple) and isinstance(key[-2], str):
        return key_cost(len(key[-2]), len(key[-1]))
    return 0
