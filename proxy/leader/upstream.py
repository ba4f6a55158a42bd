"""What every conversation with upstream shares: the HTTP client's settings, and a periodic flush loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import httpx

from proxy import __version__
from proxy.config.settings import Settings

log = logging.getLogger("proxy.leader")

USER_AGENT = f"flagsmith-edge-proxy-python/{__version__}"


def upstream_client(
    settings: Settings, headers: dict[str, str] | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    # Redirects are never followed blindly (a key must not reach another host). trust_env (the default)
    # honours HTTPS_PROXY / HTTP_PROXY / NO_PROXY and SSL_CERT_FILE.
    return httpx.AsyncClient(
        timeout=settings.api_poll_timeout_seconds,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        transport=transport,
    )


async def flush_every(interval: float, stop: asyncio.Event, flush: Callable[[], Awaitable[object]], name: str) -> None:
    """Call `flush` every `interval` seconds, and once more when `stop` is set; errors are logged, not raised."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        try:
            await flush()
        except Exception:  # never let a reporter take the leader down
            log.exception("%s flush failed", name)
