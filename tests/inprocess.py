"""The in-process tier: the real application and Store, no processes, no sockets.

`InProcessProxy` builds a worker's `Store` with states from documents (as `Follower` would from a
publication, their answers encoded here as the leader would), the application a worker serves from
`proxy.http.app.build_asgi` (the fast path in front of BlackSheep unless `server.fast_path` is off), and sends
raw ASGI calls (tests/asgi.py) on its own event loop, so a route test costs well under a millisecond.
Processes, publication, Granian and failures stay in the real-process tier (`tests/support.py` `ProxyProcess`).
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.area.manifest import Location, ManifestEntry
from proxy.area.subscriber import Update
from proxy.config.settings import Settings
from proxy.http.app import build_asgi
from proxy.worker.environment import EnvironmentState
from proxy.worker.store import Store
from tests.asgi import call
from tests.support import KEYS


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    raw: bytes  # the body as sent (gzip when encoded)

    @property
    def content(self) -> bytes:
        return gzip.decompress(self.raw) if self.headers.get("content-encoding") == "gzip" else self.raw

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        return orjson.loads(self.content)


def settings_for(**overrides: Any) -> Settings:
    pairs = [{"server_side_key": server, "client_side_key": client} for server, client in KEYS.items()]
    return Settings(environment_key_pairs=pairs, api_url="http://127.0.0.1:9", **overrides)


class InProcessProxy:
    def __init__(self, settings: Settings, documents: dict[str, dict[str, Any]]) -> None:
        """`documents`: server key → environment document (as upstream serves it)."""
        self.settings = settings
        self.store = Store(settings)
        client_keys = {pair.server_side_key: pair.client_side_key for pair in settings.environment_key_pairs}
        published = {client_keys[server]: orjson.dumps(document) for server, document in documents.items()}
        self.publish(published)
        self.asgi, self.app = build_asgi(settings, self.store)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.app.start())

    def publish(self, documents: dict[str, bytes], last_success: float | None = None) -> None:
        """Swap in a new generation, as a worker's Follower does after a publication."""
        now = time.time() if last_success is None else last_success
        entries = {
            pair.client_side_key: ManifestEntry(
                server_keys={pair.server_side_key: None},
                last_success=now,
                location=Location(f"env-{pair.client_side_key}.json", len(data), zlib.crc32(data))
                if (data := documents.get(pair.client_side_key)) is not None
                else None,
            )
            for pair in self.settings.environment_key_pairs
        }
        evaluators = self.store.evaluators
        built = {key: EnvironmentState.of_document(key, data, evaluators) for key, data in documents.items()}
        self.store.apply(Update(self.store.generation + 1, True, entries, frozenset(), (None, {}), {}), built)

    def state(self, client_key: str) -> EnvironmentState:
        return self.store.states[client_key]

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = "application/json",
    ) -> Answer:
        """`content_type` None: a body with no Content-Type header."""
        # Ask for no encoding unless told (BlackSheep's TestClient, used here before, sent gzip by default).
        sent = {"accept-encoding": "identity", **{name.lower(): value for name, value in (headers or {}).items()}}
        if body is not None:
            if content_type is not None:
                sent.setdefault("content-type", content_type)
            sent.setdefault("content-length", str(len(body)))
        pairs = [(name.encode(), value.encode()) for name, value in sent.items()]
        answer = self.loop.run_until_complete(call(self.asgi, method, path.encode(), pairs, body or b""))
        names: dict[str, str] = {}
        for name, value in answer.headers:
            key = name.decode().lower()
            names[key] = f"{names[key]}, {value.decode()}" if key in names else value.decode()
        return Answer(answer.status, names, answer.body)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        return self.request("GET", path, headers)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None, **kwargs: Any) -> Answer:
        return self.request("POST", path, headers, body, **kwargs)

    def close(self) -> None:
        self.loop.run_until_complete(self.app.stop())
        self.loop.close()
