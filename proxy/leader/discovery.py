"""Proxy-config discovery (`proxy_key`): which environments to serve, asked of `{api_url}/proxy/config/`.

The answer is a list of environments, each `{client_side_key, server_side_keys: [{key, active, expires_at}]}`.
Only active, unexpired `ser.` keys count; an environment left without one is not served. A failed request
changes nothing: an outage or a rejected proxy key never wipes the proxy.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import httpx
import orjson

from proxy.leader.upstream import upstream_client
from proxy.settings import SERVER_KEY_PREFIX, Settings

log = logging.getLogger("proxy.leader")

# client key → {server key: expiry (epoch seconds) or None}
Desired = dict[str, dict[str, float | None]]


def parse_proxy_config(data: Any, now: float) -> Desired:
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON list of environments, got {type(data).__name__}")
    desired: Desired = {}
    for environment in data:
        if not isinstance(environment, dict) or not isinstance(environment.get("client_side_key"), str):
            continue
        keys: dict[str, float | None] = {}
        for server_key in environment.get("server_side_keys") or []:
            if not isinstance(server_key, dict) or not server_key.get("active", True):
                continue
            key = server_key.get("key")
            if not isinstance(key, str) or not key.startswith(SERVER_KEY_PREFIX):
                continue
            expires = _epoch(server_key.get("expires_at"))
            if expires is None or expires > now:
                keys[key] = expires
        if keys:
            desired[environment["client_side_key"]] = dict(sorted(keys.items()))
    return desired


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Discovery:
    def __init__(self, settings: Settings) -> None:
        assert settings.proxy_key is not None
        self.url = settings.api_url + "/proxy/config/"
        self.client = upstream_client(settings, {"X-Proxy-Key": settings.proxy_key})

    async def fetch(self, now: float) -> Desired | None:
        """The environments to serve, or None when the answer cannot be trusted (logged)."""
        try:
            response = await self.client.get(self.url)
            if response.status_code != 200:
                log.warning(
                    "proxy config: upstream answered HTTP %d; keeping the current environments", response.status_code
                )
                return None
            return parse_proxy_config(orjson.loads(response.content), now)
        except (httpx.HTTPError, orjson.JSONDecodeError, ValueError) as exc:
            log.warning("proxy config: %s; keeping the current environments", exc)
            return None

    async def aclose(self) -> None:
        await self.client.aclose()
