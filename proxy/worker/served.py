"""What the HTTP layer reads of one environment: the seam between a worker's state and the routes.

`Store.resolve` returns one of these. `EnvironmentState` (proxy/worker/environment.py) implements it; the
routes and the identity pipeline read nothing else of it, so the state behind it can change (pre-encoded by
the leader, an evaluator built on first use) without the routes changing.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from proxy.area.bodies import Body, KeyKind
from proxy.evaluation.engine import FlagResult


class Served(Protocol):
    @property
    def client_key(self) -> str: ...
    @property
    def environment_id(self) -> int | None: ...
    @property
    def updated_at_header(self) -> bytes | None:
        """X-Flagsmith-Document-Updated-At: the document's `updated_at` in epoch seconds."""

    @property
    def last_modified(self) -> bytes | None:
        """Last-Modified of the environment document (an IMF-fixdate)."""

    @property
    def document(self) -> Body: ...
    @property
    def etag(self) -> bytes:
        """Strong ETag of the environment document as sent plain (a hash of its bytes)."""

    @property
    def etag_gzip(self) -> bytes:
        """Strong ETag of the environment document as sent gzip-encoded."""

    @property
    def feature_names(self) -> Collection[str]: ...

    def flags(self, kind: KeyKind) -> Body: ...
    def flag(self, kind: KeyKind, name: str) -> Body | None: ...

    async def ready_for_identities(self) -> None:
        """Awaited before any identity evaluation (a no-op once the evaluator is built)."""

    def identity_body(
        self, kind: KeyKind, identifier: str, echo: list[dict[str, Any]], traits: dict[str, Any]
    ) -> bytes:
        """The encoded identity response, its bytes allocated at their size (it is cached as it is)."""

    def identity_results(
        self, kind: KeyKind, identifier: str | None, traits: dict[str, Any] | None = None
    ) -> list[FlagResult]: ...
