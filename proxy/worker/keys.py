"""A worker's key index: every client and server key, as the header bytes arrive, → its environment.

Rebuilt whole on each publication (discovery may add, remove or rotate keys) and swapped in with one
assignment, so a request sees the old index or the new one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from proxy.area.bodies import KeyKind
from proxy.http.errors import Unauthorized

ServerKeys = Mapping[str, float | None]  # server key → expiry (epoch seconds) or None


class KeyIndex:
    __slots__ = ("client_keys", "keys")

    def __init__(self, environments: Mapping[str, ServerKeys]) -> None:
        """`environments`: client key → its server keys."""
        keys: dict[bytes, tuple[KeyKind, str, float | None]] = {}
        for client_key, server_keys in environments.items():
            keys[client_key.encode()] = (KeyKind.CLIENT, client_key, None)
            for server_key, expires in server_keys.items():
                keys[server_key.encode()] = (KeyKind.SERVER, client_key, expires)
        self.keys = keys
        self.client_keys = list(environments)

    def lookup(self, key: bytes | None) -> tuple[KeyKind, str]:
        """(kind, client key) of a known key; 401 otherwise."""
        found = self.keys.get(key) if key else None
        # a discovered server key stops resolving when it expires, even between polls
        if found is None or (found[2] is not None and found[2] < time.time()):
            raise Unauthorized(f"unknown key '{(key or b'').decode('utf-8', 'replace')}'")
        return found[0], found[1]
