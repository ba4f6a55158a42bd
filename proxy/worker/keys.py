"""A worker's key index: every client and server key, as the header bytes arrive, → its environment.

Updated in place per publication, by environment (discovery may add, remove or rotate keys): a generation
that changed ten environments changes ten environments' keys. Updates run on the event loop without an
await, so a request sees the index before or after an update, never half of one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from proxy.area.bodies import KeyKind
from proxy.http.errors import Unauthorized

ServerKeys = Mapping[str, float | None]  # server key → expiry (epoch seconds) or None


class KeyIndex:
    __slots__ = ("_server_keys", "client_keys", "keys")

    def __init__(self, environments: Mapping[str, ServerKeys] | None = None) -> None:
        """`environments`: client key → its server keys."""
        self.keys: dict[bytes, tuple[KeyKind, str, float | None]] = {}
        self.client_keys: dict[str, None] = {}  # every environment served, in the order it was added
        self._server_keys: dict[str, tuple[str, ...]] = {}
        for client_key, server_keys in (environments or {}).items():
            self.set(client_key, server_keys)

    def set(self, client_key: str, server_keys: ServerKeys) -> None:
        """Serve `client_key` with exactly `server_keys` (a rotated-out key stops resolving at once)."""
        self._drop_server_keys(client_key)
        self.keys[client_key.encode()] = (KeyKind.CLIENT, client_key, None)
        for server_key, expires in server_keys.items():
            self.keys[server_key.encode()] = (KeyKind.SERVER, client_key, expires)
        self._server_keys[client_key] = tuple(server_keys)
        self.client_keys[client_key] = None

    def remove(self, client_key: str) -> None:
        self._drop_server_keys(client_key)
        self._server_keys.pop(client_key, None)
        if self.client_keys.pop(client_key, 0) is None:
            del self.keys[client_key.encode()]

    def _drop_server_keys(self, client_key: str) -> None:
        for server_key in self._server_keys.get(client_key, ()):
            found = self.keys.get(server_key.encode())
            if found is not None and found[1] == client_key:  # moved to another environment: theirs now
                del self.keys[server_key.encode()]

    def lookup(self, key: bytes | None) -> tuple[KeyKind, str]:
        """(kind, client key) of a known key; 401 otherwise."""
        found = self.keys.get(key) if key else None
        # a discovered server key stops resolving when it expires, even between polls
        if found is None or (found[2] is not None and found[2] < time.time()):
            raise Unauthorized(f"unknown key '{(key or b'').decode('utf-8', 'replace')}'")
        return found[0], found[1]
