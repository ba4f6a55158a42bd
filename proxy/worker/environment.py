"""One environment as a worker serves it: a view over the leader's published bytes, and its evaluator.

The document and its answers file (`proxy/area/answers.py`) are shared mappings of the published files
(`proxy/area/shared_bytes.py`): every worker reads the same pages, and a worker holds per environment only
this object and the answers' fixed header (about 100 bytes). Environment-level routes are slices of the
answers; an identity needs the environment's evaluator, which `Evaluators` (`proxy/worker/evaluators.py`)
builds on first need (`ready_for_identities`). The routes read only what `proxy/worker/served.py` names.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from proxy.area import answers
from proxy.area.answers import GZIPPED, Header, Section, Singles
from proxy.area.bodies import Body, KeyKind
from proxy.evaluation.engine import FlagResult
from proxy.evaluation.environment import answers_for, document_etag
from proxy.worker.evaluators import Evaluator, Evaluators


class Readable(Protocol):
    """Bytes to read from: a shared mapping (`SharedBytes`) or bytes the worker holds (`OwnBytes`)."""

    def __len__(self) -> int: ...
    def slice(self, start: int, length: int) -> bytes: ...
    def bytes(self) -> bytes: ...


class OwnBytes:
    """Bytes held by this process: answers a worker built itself (a publication without them), tests."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def slice(self, start: int, length: int) -> bytes:
        return self.data[start : start + length]

    def bytes(self) -> bytes:
        return self.data


class EnvironmentState:
    __slots__ = (
        "_answers",
        "_document",
        "_evaluators",
        "_header",
        "_singles",
        "client_key",
        "environment_id",
        "etag",
        "etag_gzip",
        "evaluator",
        "last_modified",
        "updated_at_header",
    )

    def __init__(
        self, client_key: str, document: Readable, answers_file: Readable, evaluators: Evaluators | None = None
    ) -> None:
        """Raises AnswersError when `answers_file` is not an answers file this version reads."""
        self.client_key = client_key
        self._document = document
        self._answers = answers_file
        self._header = header = Header.parse(answers_file.slice(0, answers.HEADER_SIZE))
        self.environment_id = header.environment_id
        self.updated_at_header = self._section(Section.UPDATED_AT)
        self.last_modified = self._section(Section.LAST_MODIFIED)
        # strong validators of /api/v1/environment-document/, one per representation (the leader hashed the bytes)
        self.etag: bytes = self._section(Section.ETAG) or document_etag(document.bytes())
        self.etag_gzip: bytes = self.etag[:-1] + b'-gzip"'
        self._singles: tuple[Singles, Singles] | None = None
        self._evaluators = evaluators
        self.evaluator: Evaluator | None = None  # set by Evaluators while kept

    @classmethod
    def of_document(cls, client_key: str, document: bytes, evaluators: Evaluators | None = None) -> EnvironmentState:
        """A state whose answers this worker encodes itself: what a publication without answers gets (an
        older leader's), and the in-process tier. Raises what the leader's check would for a bad document."""
        return cls(client_key, OwnBytes(document), OwnBytes(answers_for(document)), evaluators)

    def _section(self, section: Section) -> bytes | None:
        where = self._header.section(section)
        return None if where is None else self._answers.slice(*where)

    # -- environment-level answers: slices of the shared answers file ----------------------------------
    def flags(self, kind: KeyKind) -> Body:
        """`GET /api/v1/flags/` as `kind` sees it."""
        return Body(self._section(answers.FLAGS[kind]) or b"[]", self._section(GZIPPED[kind]))

    def flag(self, kind: KeyKind, name: str) -> Body | None:
        """`GET /api/v1/flags/?feature=name` as `kind` sees it; None: not there (or hidden from `kind`)."""
        at = self._single_index()[kind].get(name)
        if at is None:
            return None
        return Body(self._answers.slice(at[0], at[1]), self._answers.slice(at[2], at[3]) if len(at) == 4 else None)

    @property
    def feature_names(self) -> Collection[str]:
        return self._single_index()[KeyKind.SERVER].keys()  # server keys see every feature

    def _single_index(self) -> tuple[Singles, Singles]:
        if self._singles is None:  # read on the first `?feature=` or analytics request only
            self._singles = answers.parse_singles(self._section(Section.SINGLES) or b'{"client":{},"server":{}}')
        return self._singles

    @property
    def document(self) -> Body:
        return Body(self._document.bytes(), self._section(Section.DOCUMENT_GZIP))

    def document_bytes(self) -> bytes:
        return self._document.bytes()

    # -- identities --------------------------------------------------------------------------------------
    async def ready_for_identities(self) -> None:
        """Awaited before identity evaluation: builds the evaluator on first need (off the event loop)."""
        evaluators = self._evaluators
        if evaluators is None:
            return
        if self.evaluator is not None:
            evaluators.touch(self)  # the common case: no await, no build
        else:
            await evaluators.ready(self)

    def _evaluator(self) -> Evaluator:
        evaluator = self.evaluator
        if evaluator is None:  # used without ready_for_identities (direct callers, not the routes): build here
            evaluator = self.evaluator = Evaluator(self.client_key, self.document_bytes())
        return evaluator

    def identity_body(
        self, kind: KeyKind, identifier: str, echo: list[dict[str, Any]], traits: dict[str, Any]
    ) -> bytes:
        return self._evaluator().identity_body(kind, identifier, echo, traits)

    def identity_flags(self, kind: KeyKind, identifier: str, traits: dict[str, Any]) -> list[dict[str, Any]]:
        return self._evaluator().identity_flags(kind, identifier, traits)

    def identity_results(
        self, kind: KeyKind, identifier: str | None, traits: dict[str, Any] | None = None
    ) -> list[FlagResult]:
        return self._evaluator().identity_results(kind, identifier, traits)
