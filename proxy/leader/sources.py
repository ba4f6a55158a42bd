"""Where environment documents come from: the Flagsmith API over HTTP, or files on disk.

A source answers one question per environment: "is there a newer document than the one I hold?" with
`Fetched` (a validated document), `NotModified`, or `FetchFailed` (the reason, for health and logs).
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit
from urllib.request import getproxies, proxy_bypass

import httpx
import orjson

from proxy.config.masking import mask_key, mask_url, mask_urls_in
from proxy.config.settings import Settings, file_source_dir
from proxy.evaluation.mapping import DocumentError, validate_document
from proxy.leader.http11 import Answer, Pool, TooLarge, UpstreamError, UpstreamTimeout
from proxy.leader.upstream import USER_AGENT, upstream_client
from proxy.metrics import tracing

log = logging.getLogger("proxy.leader")

MAX_PAGES = 1000
MAX_REDIRECTS = 5


@dataclass(frozen=True, slots=True)
class Fetched:
    document: dict[str, Any]
    etag: str | None = None  # the upstream's ETag for it (another edge proxy sends one; Flagsmith's API does not)


@dataclass(frozen=True, slots=True)
class NotModified:
    pass


@dataclass(frozen=True, slots=True)
class FetchFailed:
    reason: str  # for logs and, with health_check.show_details, health
    kind: str = "upstream_error"  # a short category, always safe to show; the `reason` label of fetch errors


FetchResult = Fetched | NotModified | FetchFailed


@dataclass(frozen=True, slots=True)
class Validator:
    """What identifies the document held, for a conditional fetch. Taken only from what this source itself
    answered (never from a snapshot: a stored date must not make upstream confirm a stored document)."""

    updated_at: datetime | None = None  # the document's updated_at: If-Modified-Since
    etag: str | None = None  # the upstream's ETag: If-None-Match, preferred (exact, where a date has 1 s precision)


class Source(Protocol):
    async def fetch(self, server_key: str, held: Validator | None) -> FetchResult: ...

    async def aclose(self) -> None: ...


@functools.lru_cache(maxsize=16384)  # asked once per poll, changes once per document
def if_modified_since(updated_at: datetime) -> str:
    """IMF-fixdate in GMT, zero-padded (`Sun, 06 Nov 1994 08:49:37 GMT`): Django rejects `+0000`."""
    return format_datetime(updated_at.astimezone(UTC).replace(microsecond=0), usegmt=True)


def _check(document: Any) -> FetchResult:
    try:
        validate_document(document)
    except DocumentError as exc:
        return FetchFailed(f"invalid document: {exc}", "invalid_document")
    return Fetched(document)


class DocumentTooLarge(Exception):
    pass


class HttpSource:
    """`GET {api_url}/environment-document/`, conditional (If-None-Match on the ETag an upstream proxy sent,
    else If-Modified-Since), following same-origin pages.

    Every fetch goes through one keep-alive pool to the upstream origin (`proxy/leader/http11.py`: about a
    tenth of httpx's CPU per request), or through httpx when an environment proxy applies (HTTPS_PROXY,
    HTTP_PROXY, NO_PROXY) or a transport is given (the in-process tests). Bodies are read within
    `max_document_bytes` (all pages together), so an upstream cannot make the leader buffer without bound.
    """

    def __init__(
        self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None, tracer: Any = None
    ) -> None:
        self.url = settings.api_url + "/environment-document/"
        self.tracer = tracer  # OpenTelemetry (proxy/metrics/tracing.py), None when traces are off
        self.traced_url = mask_url(self.url)
        self.origin = _origin(self.url)
        self.poll_frequency = settings.api_poll_frequency_seconds
        self.max_bytes = settings.max_document_bytes
        self.client: httpx.AsyncClient | None = None
        self.pool: Pool | None = None
        if transport is not None or _proxied(self.url):
            self.client = upstream_client(settings, transport=transport)
        else:
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip"}
            context = httpx.create_ssl_context() if self.origin[0] == "https" else None  # SSL_CERT_FILE, as httpx
            self.pool = Pool(
                f"{self.origin[0]}://{self.origin[1]}", settings.api_poll_timeout_seconds, headers, context
            )

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.pool is not None:
            await self.pool.aclose()

    async def fetch(self, server_key: str, held: Validator | None) -> FetchResult:
        if self.tracer is None:  # traces off: no span to make, not even a no-op one
            return await self._fetch(server_key, held, {})
        with tracing.fetch_span(self.tracer, "GET environment-document", self.traced_url) as span:
            result = await self._fetch(server_key, held, span.headers)
            if isinstance(result, Fetched):
                span.outcome(200, result.document.get("id"))
            elif isinstance(result, NotModified):
                span.outcome(304)
            else:
                span.outcome(None, error=result.kind)
            return result

    async def _fetch(self, server_key: str, held: Validator | None, trace_headers: dict[str, str]) -> FetchResult:
        started = time.monotonic()
        # trace_headers: `traceparent` of the fetch's span, sent with every page
        headers = {"X-Environment-Key": server_key, **trace_headers}
        if held is not None and held.etag is not None:
            # Alone: an upstream that sends ETags decides by them (RFC 9110 13.2.2), and a date would be
            # wrong for two changes within one second (If-Modified-Since has one-second precision).
            headers["If-None-Match"] = held.etag
        elif held is not None and held.updated_at is not None:
            headers["If-Modified-Since"] = if_modified_since(held.updated_at)
        self._budget = self.max_bytes
        try:
            response = await self._get(self.url, headers)
            if response.status_code == 304:
                if "If-None-Match" not in headers and "If-Modified-Since" not in headers:
                    return FetchFailed("upstream answered 304 Not Modified to an unconditional request", "http_status")
                return NotModified()
            if response.status_code != 200:
                return FetchFailed(f"upstream answered HTTP {response.status_code}", _status_kind(response.status_code))
            document = orjson.loads(response.content)
            if not isinstance(document, dict):
                return FetchFailed(
                    f"invalid document: a JSON {type(document).__name__}, not an object", "invalid_document"
                )
            page_headers = {"X-Environment-Key": server_key, **trace_headers}
            result = await self._follow_pages(response, document, page_headers)
            if isinstance(result, Fetched):
                result = Fetched(result.document, response.headers.get("etag"))  # the first page's
        except (httpx.TimeoutException, UpstreamTimeout):
            return FetchFailed("upstream timed out", "timeout")
        except (httpx.HTTPError, UpstreamError) as exc:
            return FetchFailed(f"upstream request failed: {type(exc).__name__}: {mask_urls_in(str(exc))}", "network")
        except orjson.JSONDecodeError as exc:
            return FetchFailed(f"upstream sent invalid JSON: {exc}", "invalid_json")
        except DocumentTooLarge:
            return FetchFailed(
                f"document larger than {self.max_bytes} bytes (raise max_document_bytes to accept it)", "too_large"
            )
        elapsed = time.monotonic() - started
        if elapsed > self.poll_frequency:
            log.warning("fetching %s took %.1fs, longer than the poll interval", mask_key(server_key), elapsed)
        return result

    async def _follow_pages(self, response: Answer, document: dict[str, Any], headers: dict[str, str]) -> FetchResult:
        # Later pages repeat the document; only their identity_overrides are appended (page 1 wins).
        overrides = list(document.get("identity_overrides") or [])
        pages = 1
        while (next_url := response.next_link()) is not None:
            target = urljoin(response.url, next_url)
            if _origin(target) != self.origin:
                return FetchFailed(f"refusing a next page on another origin ({_origin(target)})", "redirect")
            pages += 1
            if pages > MAX_PAGES:
                return FetchFailed(f"more than {MAX_PAGES} pages", "too_large")
            response = await self._get(target, headers)
            if response.status_code != 200:
                return FetchFailed(
                    f"upstream answered HTTP {response.status_code} for page {pages}",
                    _status_kind(response.status_code),
                )
            page = orjson.loads(response.content)
            if not isinstance(page, dict):
                return FetchFailed(f"page {pages} is not a JSON object", "invalid_document")
            overrides.extend(page.get("identity_overrides") or [])
        if pages > 1:
            document["identity_overrides"] = overrides
        return _check(document)

    async def _get(self, url: str, headers: dict[str, str]) -> Answer:
        # Redirects are followed by hand: same origin only, so keys never leak to another host.
        for _ in range(MAX_REDIRECTS + 1):
            response = await self._read_capped(url, headers)
            if response.status_code not in (301, 302, 303, 307, 308):
                return response
            target = urljoin(url, response.headers.get("location", ""))
            if _origin(target) != self.origin:
                raise UpstreamError(f"refusing a redirect to another origin ({_origin(target)})")
            url = target
        raise UpstreamError("too many redirects")

    async def _read_capped(self, url: str, headers: dict[str, str]) -> Answer:
        if self.pool is not None:
            try:
                answer = await self.pool.get(url, headers, self._budget)
            except TooLarge:
                raise DocumentTooLarge from None
            self._budget -= len(answer.content)
            if self._budget < 0:
                raise DocumentTooLarge
        else:
            answer = await self._read_with_httpx(url, headers)
        answer.content = _decode(answer.headers.get("content-encoding", ""), answer.content, self.max_bytes)
        return answer

    async def _read_with_httpx(self, url: str, headers: dict[str, str]) -> Answer:
        assert self.client is not None
        async with self.client.stream("GET", url, headers={**headers, "Accept-Encoding": "gzip"}) as response:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self._budget:
                raise DocumentTooLarge
            chunks = []
            async for chunk in response.aiter_raw():
                self._budget -= len(chunk)
                if self._budget < 0:
                    raise DocumentTooLarge
                chunks.append(chunk)
        return Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, b"".join(chunks), url)


def _proxied(url: str) -> bool:
    """Does an environment proxy apply to `url` (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, unless NO_PROXY)?"""
    proxies = getproxies()
    scheme, netloc = _origin(url)
    if not (proxies.get(scheme) or proxies.get("all")):
        return False
    return not proxy_bypass(netloc.rsplit(":", 1)[0])


def _decode(encoding: str, raw: bytes, limit: int) -> bytes:
    # decoded bytes count against the same limit (a small gzip body can expand a thousandfold)
    encoding = encoding.lower()
    if encoding in ("", "identity"):
        return raw
    if encoding != "gzip":
        raise UpstreamError(f"unsupported content-encoding {encoding!r}")
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = decompressor.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise UpstreamError(f"invalid gzip body: {exc}") from None
    if len(data) > limit:
        raise DocumentTooLarge
    return data


def _status_kind(status: int) -> str:
    # by class: a revoked key (4xx) and an upstream outage (5xx) call for different actions
    return f"http_{status // 100}xx" if 100 <= status < 600 else "http_status"


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


class FileSource:
    """Documents from files: `<directory>/<server side key>.json`, re-read when the file changes.

    For air-gapped installs and the bundled demo. A file's modification time plays the role of
    Last-Modified.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._mtimes: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> FileSource:
        return cls(file_source_dir(settings.api_url))

    async def aclose(self) -> None:
        return None

    async def fetch(self, server_key: str, held: Validator | None) -> FetchResult:
        path = self.directory / f"{server_key}.json"
        try:
            mtime = path.stat().st_mtime_ns
            if held is not None and self._mtimes.get(server_key) == mtime:
                return NotModified()
            document = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return FetchFailed(f"no file {self.directory}/{mask_key(server_key)}.json", "file")
        except OSError as exc:
            return FetchFailed(f"cannot read the document file: {exc.strerror}", "file")
        except orjson.JSONDecodeError as exc:
            return FetchFailed(f"the document file holds invalid JSON: {exc}", "invalid_json")
        result = _check(document)
        if isinstance(result, Fetched):
            self._mtimes[server_key] = mtime
        return result


def make_source(settings: Settings, tracer: Any = None) -> Source:
    if settings.api_url.lower().startswith("file:"):
        return FileSource.from_settings(settings)
    return HttpSource(settings, tracer=tracer)
