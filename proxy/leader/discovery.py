"""Proxy-config discovery (`proxy_key`): which environments to serve, asked of `{api_url}/proxy/config/`.

The answer is a list of environments, each `{client_side_key, server_side_keys: [{key, active, expires_at}]}`.
Only active, unexpired `ser.` keys count; an environment left without one is not served. A failed request
changes nothing: an outage or a rejected proxy key never wipes the proxy.

A large organisation's answer (thousands of environments) can take longer to compute and send than one
document: the request has its own deadline, `deadline(settings)`, never shorter than a whole document fetch
may take (`api_fetch_deadline_seconds`), and a failure's log line names the error (a timeout's text is empty).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

import httpx
import orjson

from proxy.config.masking import mask_key
from proxy.config.sections import SERVER_KEY_PREFIX
from proxy.config.settings import Settings
from proxy.leader.upstream import upstream_client

log = logging.getLogger("proxy.leader")

# client key → {server key: expiry (epoch seconds) or None}
Desired = dict[str, dict[str, float | None]]


def parse_proxy_config(data: Any, now: float, reserved: frozenset[str] = frozenset()) -> Desired:
    """The environments to serve. Every entry is checked on its own: a bad one is skipped with a log line,
    never trusted. No key may serve two environments, and none may take over a key in `reserved` (the
    configured pairs): a client key that looks like a server key, or a server key that is another
    environment's key, is refused."""
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON list of environments, got {type(data).__name__}")
    desired: Desired = {}
    claimed: set[str] = set(reserved)
    for index, environment in enumerate(data):
        problem = _entry_problem(environment)
        if problem is not None:
            log.warning("proxy config: entry %d skipped: %s", index, problem)
            continue
        client_key: str = environment["client_side_key"]
        if client_key in claimed:
            log.warning(
                "proxy config: entry %d skipped: its client key %s is already used", index, mask_key(client_key)
            )
            continue
        keys: dict[str, float | None] = {}
        for server_key in environment.get("server_side_keys") or []:
            if not isinstance(server_key, dict) or not server_key.get("active", True):
                continue
            key = server_key.get("key")
            if not isinstance(key, str) or not key.startswith(SERVER_KEY_PREFIX) or len(key) == len(SERVER_KEY_PREFIX):
                log.warning("proxy config: entry %d: a server key that is not a 'ser.' string skipped", index)
                continue
            if key in claimed or key == client_key:
                log.warning("proxy config: entry %d: server key %s is already used, skipped", index, mask_key(key))
                continue
            expires = _epoch(server_key.get("expires_at"))
            if expires is None or expires > now:
                keys[key] = expires
        if keys:
            claimed.add(client_key)
            claimed.update(keys)
            desired[client_key] = dict(sorted(keys.items()))
    return desired


def _entry_problem(environment: Any) -> str | None:
    if not isinstance(environment, dict):
        return f"not an object ({type(environment).__name__})"
    client_key = environment.get("client_side_key")
    if not isinstance(client_key, str) or not client_key.strip():
        return "client_side_key is missing or not a string"
    if client_key.startswith(SERVER_KEY_PREFIX):
        return f"client_side_key {mask_key(client_key)} starts with '{SERVER_KEY_PREFIX}'"
    server_keys = environment.get("server_side_keys")
    if server_keys is not None and not isinstance(server_keys, list):
        return f"server_side_keys is not a list ({type(server_keys).__name__})"
    return None


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def deadline(settings: Settings) -> float:
    """Seconds the proxy config answer may take, whole: as long as a document fetch with its pages."""
    return max(settings.api_fetch_deadline_seconds, settings.api_poll_timeout_seconds)


def describe(exc: BaseException) -> str:
    """An error for a log line: its type always (httpx's timeouts have no text), its text when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Discovery:
    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        assert settings.proxy_key is not None
        self.url = settings.api_url + "/proxy/config/"
        self.deadline = deadline(settings)
        self.client = upstream_client(settings, {"X-Proxy-Key": settings.proxy_key}, transport)
        self.reserved = frozenset(
            key for pair in settings.environment_key_pairs for key in (pair.client_side_key, pair.server_side_key)
        )

    async def fetch(self, now: float) -> Desired | None:
        """The environments to serve, or None when the answer cannot be trusted (logged)."""
        try:
            async with asyncio.timeout(self.deadline):
                # each read may take the whole deadline: the answer's first byte can be the slow one
                response = await self.client.get(self.url, timeout=self.deadline)
            if response.status_code != 200:
                log.warning(
                    "proxy config: upstream answered HTTP %d; keeping the current environments", response.status_code
                )
                return None
            return parse_proxy_config(orjson.loads(response.content), now, self.reserved)
        except TimeoutError:
            log.warning("proxy config: no answer within %g s; keeping the current environments", self.deadline)
            return None
        except (httpx.HTTPError, orjson.JSONDecodeError, ValueError) as exc:
            log.warning("proxy config: %s; keeping the current environments", describe(exc))
            return None

    async def aclose(self) -> None:
        await self.client.aclose()
