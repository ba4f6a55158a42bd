"""A fake Flagsmith API: a real HTTP server on 127.0.0.1 with failure modes driven by the tests.

Serves `GET /api/v1/environment-document/` chosen by `X-Environment-Key`, honours If-Modified-Since the
way Django does (IMF-fixdate GMT only, second precision), sends Last-Modified, and can paginate.
Failure modes: `fail` (HTTP status), `garbage` ("list", "notjson", "304", "invalid"), `delay` (seconds),
and per environment: `trickle[key]` (seconds between chunks of its document), `stall` (keys answered only
after STALL seconds), `oversize[key]` (bytes of padding added to its document); `analytics_delay`
(seconds before answering an analytics post).
"""

from __future__ import annotations

import copy
import json
import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

STALL = 120.0  # seconds a stalled answer waits (ends at once when the fake stops)


class FakeFlagsmith:
    def __init__(self, documents: dict[str, dict[str, Any]]) -> None:
        self.documents = {key: copy.deepcopy(doc) for key, doc in documents.items()}
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.analytics: list[dict[str, Any]] = []  # POST /api/v1/analytics/flags/: {"key", "body"}
        self.proxy_key = "pk.test-proxy-key"
        self.proxy_config: list[dict[str, Any]] = []  # GET /api/v1/proxy/config/
        self.proxy_config_fail: int | None = None
        self.usage: list[dict[str, Any]] = []  # POST /api/v1/proxy/usage/: {"idempotency_key", "rows"}
        self.usage_fail: int | None = None
        self.fail: int | None = None
        self.garbage: str | None = None
        self.delay = 0.0
        self.page_size: int | None = None  # identity overrides per page; None: no pagination
        self.next_link: str | None = None  # force a `Link: <...>; rel="next"` (e.g. another origin)
        self.trickle: dict[str, float] = {}
        self.stall: set[str] = set()
        self.oversize: dict[str, int] = {}
        self.analytics_delay = 0.0
        self.closing = threading.Event()  # set by stop(): stalled and trickling answers end at once
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def start(self) -> FakeFlagsmith:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def count(self, key: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if key is None or r["key"] == key)

    def set_document(self, key: str, document: dict[str, Any]) -> None:
        with self.lock:
            self.documents[key] = copy.deepcopy(document)

    def toggle(self, key: str, feature_name: str) -> bool:
        """Flip a feature's enabled state and bump updated_at; returns the new state."""
        with self.lock:
            document = self.documents[key]
            for state in document["feature_states"]:
                if state["feature"]["name"] == feature_name:
                    state["enabled"] = not state["enabled"]
                    enabled = state["enabled"]
                    break
            else:
                raise KeyError(feature_name)
            # Last-Modified has second precision: a later change must be at least a second later
            previous = datetime.fromisoformat(document["updated_at"])
            document["updated_at"] = max(datetime.now(UTC), previous + timedelta(seconds=1)).isoformat()
            return enabled

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path = urlsplit(self.path).path
                if path == "/api/v1/proxy/usage/":
                    if self.headers.get("X-Proxy-Key") != fake.proxy_key:
                        return self._send(401, b'{"detail":"bad proxy key"}')
                    if fake.usage_fail:
                        return self._send(fake.usage_fail, b'{"detail":"failure on demand"}')
                    with fake.lock:
                        fake.usage.append(
                            {"idempotency_key": self.headers.get("Idempotency-Key"), "rows": json.loads(body)}
                        )
                    return self._send(202, b"{}")
                if path != "/api/v1/analytics/flags/":
                    return self._send(404, b'{"detail":"Not Found"}')
                if fake.analytics_delay:
                    fake.closing.wait(fake.analytics_delay)
                if fake.fail:
                    return self._send(fake.fail, b'{"detail":"failure on demand"}')
                with fake.lock:
                    fake.analytics.append({"key": self.headers.get("X-Environment-Key"), "body": json.loads(body)})
                return self._send(200, b"{}")

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                key = self.headers.get("X-Environment-Key")
                with fake.lock:
                    fake.requests.append(
                        {
                            "path": parts.path,
                            "query": parts.query,
                            "key": key,
                            "ims": self.headers.get("If-Modified-Since"),
                            "inm": self.headers.get("If-None-Match"),
                            "ua": self.headers.get("User-Agent"),
                            "traceparent": self.headers.get("traceparent"),
                        }
                    )
                    delay, fail, garbage = fake.delay, fake.fail, fake.garbage
                    document = copy.deepcopy(fake.documents.get(key or ""))
                    trickle, stall, padding = (
                        fake.trickle.get(key or ""),
                        key in fake.stall,
                        fake.oversize.get(key or ""),
                    )
                if delay:
                    threading.Event().wait(delay)
                if stall:
                    fake.closing.wait(STALL)
                if parts.path == "/api/v1/proxy/config/":
                    if fake.proxy_config_fail:
                        return self._send(fake.proxy_config_fail, b'{"detail":"failure on demand"}')
                    if self.headers.get("X-Proxy-Key") != fake.proxy_key:
                        return self._send(401, b'{"detail":"bad proxy key"}')
                    with fake.lock:
                        return self._send(200, json.dumps(fake.proxy_config).encode())
                if parts.path.rstrip("/") != "/api/v1/environment-document":
                    return self._send(404, b'{"detail":"Not Found"}')
                if fail:
                    return self._send(fail, b'{"detail":"failure on demand"}')
                if garbage == "list":
                    return self._send(200, b"[1,2,3]")
                if garbage == "notjson":
                    return self._send(200, b"<html>oops</html>")
                if garbage == "304":
                    return self._send(304, b"")
                if garbage == "invalid":
                    return self._send(200, b'{"api_key":"x","feature_states":"nope"}')
                if document is None:
                    return self._send(401, b'{"detail":"Invalid or missing Environment Key"}')
                updated = datetime.fromisoformat(document["updated_at"]).replace(microsecond=0)
                last_modified = format_datetime(updated.astimezone(UTC), usegmt=True)
                ims = self.headers.get("If-Modified-Since")
                if ims and ims.endswith(" GMT") and "page_id" not in parts.query:
                    try:
                        if updated <= parsedate_to_datetime(ims):
                            return self._send(304, b"", {"Last-Modified": last_modified})
                    except (TypeError, ValueError):
                        pass
                headers = {"Last-Modified": last_modified}
                overrides = document.get("identity_overrides") or []
                if fake.page_size:
                    page = int(parse_qs(parts.query).get("page_id", ["0"])[0])
                    start = page * fake.page_size
                    document["identity_overrides"] = overrides[start : start + fake.page_size]
                    if start + fake.page_size < len(overrides):
                        headers["Link"] = f'</api/v1/environment-document/?page_id={page + 1}>; rel="next"'
                if fake.next_link:
                    headers["Link"] = f'<{fake.next_link}>; rel="next"'
                if padding:
                    document["padding"] = "x" * padding
                if trickle:
                    return self._trickle(json.dumps(document).encode(), headers, trickle)
                return self._send(200, json.dumps(document).encode(), headers)

            def _trickle(self, body: bytes, headers: dict[str, str], interval: float) -> None:
                # the whole length declared, then a few bytes at a time: a read timeout never fires
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                for start in range(0, len(body), 16):
                    if fake.closing.wait(interval):
                        return
                    try:
                        self.wfile.write(body[start : start + 16])
                        self.wfile.flush()
                    except OSError:
                        return

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                if status != 304:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if status == 304:
                    self.send_header("Content-Length", "0")
                self.end_headers()
                if status != 304:
                    self.wfile.write(body)

        return Handler
