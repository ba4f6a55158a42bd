"""The SDKs' real-time stream: `GET /sse/environments/{client key}/stream` (server-sent events).

What the official SDKs expect (flagsmith 6.x Python, `flagsmith` JS 10.x): an event named
`environment_updated` (the JS client listens for that name; the Python SDK takes any) whose data is
`{"updated_at": <epoch seconds, float>}`; a client refetches its flags or environment document when that
is newer than what it holds. The JS client compares it with the `X-Flagsmith-Document-Updated-At` header
of its last flags response, so both carry the same number.

Each worker keeps its own streams (`StreamHub`). The hub learns of changes from `Store.apply` (the
worker already follows the shared-memory generation), so a changed document wakes that environment's
streams, and an unchanged poll (no new state is built) wakes none. A stream's event id is the document's
`updated_at`: it means the same on every worker and every replica, so a reconnect carrying `Last-Event-ID`
(or the `lastEventId` query parameter that reconnecting-eventsource adds) gets the current state only when
it missed a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import unquote

from blacksheep import Request, Response, StreamedContent

from proxy.area.bodies import KeyKind
from proxy.config.masking import mask_key
from proxy.config.sections import RealtimeSettings
from proxy.http.errors import NotFound, ServiceUnavailable, Unauthorized
from proxy.http.identity_request import query_param
from proxy.http.raw_request import raw_path, raw_query
from proxy.metrics import prometheus as metrics
from proxy.worker.environment import EnvironmentState
from proxy.worker.store import Store

log = logging.getLogger("proxy.realtime")

PREFIX = b"/sse/environments/"
SUFFIX = b"/stream"
EVENT_NAME = b"environment_updated"
RETRY_MS = 1000  # what a browser EventSource waits before reconnecting (the Python SDK waits 1 s too)
EVENT_STREAM = b"text/event-stream"
STREAM_HEADERS = [
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),  # nginx: pass events through, do not buffer them
]


def event_id(state: EnvironmentState) -> bytes:
    """The document's updated_at as the SDKs parse it (epoch seconds), also used as the SSE id."""
    return state.updated_at_header or b"0"


def encode_event(state: EnvironmentState) -> bytes:
    stamp = event_id(state)
    return b'id: %s\nevent: %s\ndata: {"updated_at": %s}\n\n' % (stamp, EVENT_NAME, stamp)


def client_key_of(path: bytes) -> str | None:
    """`/sse/environments/<key>/stream` (with or without a trailing slash) → the key, else None."""
    if not path.startswith(PREFIX):
        return None
    rest = path[len(PREFIX) :].removesuffix(b"/")
    if not rest.endswith(SUFFIX):
        return None
    key = rest[: -len(SUFFIX)]
    if not key or b"/" in key:
        return None
    return unquote(key.decode("utf-8", "replace"))


class _Stream:
    """One open stream's wake-up: a change, a keep-alive tick or the close, told apart by the flags.
    A stream waits on its Event alone, its tick a timer handle: no task per wait (asyncio.wait_for makes
    one), which with thousands of idle streams is memory and work."""

    __slots__ = ("changed", "client_key", "closed", "wake")

    def __init__(self, client_key: str) -> None:
        self.client_key = client_key
        self.wake = asyncio.Event()
        self.changed = False
        self.closed = False

    def notify(self) -> None:
        self.changed = True
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class StreamHub:
    """One worker's open streams, by environment; woken by `Store.apply`, closed on shutdown."""

    def __init__(self, settings: RealtimeSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.streams: defaultdict[str, set[_Stream]] = defaultdict(set)
        self.count = 0
        self.closing = False
        store.on_swap(self.changed)

    def changed(self, built: dict[str, EnvironmentState], gone: list[str]) -> None:
        """Called by `Store.apply` (on the event loop): wake the streams of every rebuilt environment."""
        for client_key in (*built, *gone):
            for stream in self.streams.get(client_key, ()):
                stream.notify()

    def close_all(self) -> None:
        """Shutdown: end every stream now (the SDKs reconnect, to another replica or the restarted one)."""
        self.closing = True
        for streams in self.streams.values():
            for stream in streams:
                stream.close()

    async def handle(self, request: Request) -> Response:
        path = raw_path(request)
        client_key = client_key_of(path)
        if client_key is None:
            raise NotFound("no such stream: use /sse/environments/{client-side key}/stream")
        try:
            kind, _ = self.store.keys.lookup(client_key.encode())
        except Unauthorized:
            raise NotFound(f"unknown environment key '{client_key}'") from None
        if kind is not KeyKind.CLIENT:
            # URLs end up in logs: a server-side key must never be one.
            raise Unauthorized("streams are opened with the client-side environment key, not a server-side key")
        state = self.store.states.get(client_key)
        if state is None:
            raise ServiceUnavailable("environment document not loaded yet; try again shortly")
        if self.closing:
            raise ServiceUnavailable("this worker is shutting down; reconnect")
        if self.count >= self.settings.max_streams_per_worker:
            metrics.STREAMS_REJECTED.inc()
            raise ServiceUnavailable(
                f"this worker already holds {self.settings.max_streams_per_worker} streams "
                "(realtime.max_streams_per_worker); retry later"
            )
        if request.method == "HEAD":
            return Response(200, list(STREAM_HEADERS), None)
        last_id = request.get_first_header(b"last-event-id")
        query = raw_query(request)
        if last_id is None and query:
            found = query_param(query, "lastEventId")
            last_id = found.encode() if found else None
        stream = _Stream(client_key)
        self.streams[client_key].add(stream)
        self.count += 1
        metrics.STREAMS_CONNECTED.inc()
        receive = getattr(request.content, "receive", None)
        events = self._events(stream, state, last_id, receive)

        async def provider() -> AsyncIterator[bytes]:
            async for chunk in events:
                yield chunk

        return Response(200, list(STREAM_HEADERS), StreamedContent(EVENT_STREAM, provider))

    async def _events(
        self, stream: _Stream, state: EnvironmentState, last_id: bytes | None, receive: object
    ) -> AsyncIterator[bytes]:
        watcher = asyncio.ensure_future(self._watch_disconnect(stream, receive)) if receive is not None else None
        lifetime_ends = time.monotonic() + self.settings.max_lifetime_seconds
        keepalive = self.settings.keepalive_seconds
        try:
            # The first chunk goes at once (headers flushed): the current state, unless the client has it.
            first = b"retry: %d\n" % RETRY_MS
            if last_id != event_id(state):
                yield first + encode_event(state)
                metrics.STREAM_EVENTS.inc()
            else:
                yield first + b": up to date\n\n"
            loop = asyncio.get_running_loop()
            while not stream.closed:
                remaining = lifetime_ends - time.monotonic()
                if remaining <= 0:
                    break
                tick = loop.call_later(min(keepalive, remaining), stream.wake.set)
                try:
                    await stream.wake.wait()
                finally:
                    tick.cancel()
                stream.wake.clear()
                if stream.closed:
                    break
                if not stream.changed:
                    if time.monotonic() < lifetime_ends:
                        yield b": keep-alive\n\n"
                    continue
                stream.changed = False
                current = self.store.states.get(stream.client_key)
                if current is None:
                    break  # the environment is no longer served: the client's reconnect gets the 404
                if current is not state:
                    state = current
                    yield encode_event(state)
                    metrics.STREAM_EVENTS.inc()
        finally:
            if watcher is not None:
                watcher.cancel()
            self._remove(stream)

    async def _watch_disconnect(self, stream: _Stream, receive: object) -> None:
        # The request has no body: the next ASGI message is the disconnect, whenever the client leaves.
        with contextlib.suppress(Exception):
            while True:
                message = await receive()  # type: ignore[operator]
                if message.get("type") == "http.disconnect":
                    break
        stream.close()

    def _remove(self, stream: _Stream) -> None:
        streams = self.streams.get(stream.client_key)
        if streams is not None and stream in streams:
            streams.discard(stream)
            if not streams:
                del self.streams[stream.client_key]
            self.count -= 1
            metrics.STREAMS_CONNECTED.dec()
            log.debug("stream closed for %s (%d open)", mask_key(stream.client_key), self.count)


def end_streams_on_shutdown_signal(end_streams: Callable[[], None]) -> None:
    """Make SIGTERM/SIGINT end the streams at once, so Granian's graceful stop is not held for its kill
    timeout by connections that never finish.

    Granian's worker installs its loop signal handlers (`granian._signals.set_loop_signals`) after our
    factory runs and only stops once every response has ended; we wrap that function so the same handler
    also ends the streams. Should a Granian release rename it, streams end at the worker's kill timeout.
    """
    try:
        import granian._signals as granian_signals
    except ImportError:  # pragma: no cover - Granian is a dependency
        return
    original = getattr(granian_signals, "set_loop_signals", None)
    if original is None or getattr(original, "_ends_streams", False):
        return

    def set_loop_signals(loop: asyncio.AbstractEventLoop) -> Any:
        signal_event = original(loop)

        def handler(signum: int, frame: object) -> None:
            end_streams()
            signal_event.set()

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, handler, signum, None)
        return signal_event

    set_loop_signals._ends_streams = True  # type: ignore[attr-defined]
    granian_signals.set_loop_signals = set_loop_signals
