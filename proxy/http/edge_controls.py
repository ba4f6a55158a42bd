"""Edge controls on the request path: network allow lists per route group (and, below, rate limits and
request spans), behind one framework-free object.

`EdgeControls.check(group, client, headers, key)` takes what any ASGI server hands over (the scope's
`client` tuple, its raw `(name, value)` header pairs, the environment key the route reads) and answers
None (go on) or a `Refusal` (status, JSON body, extra headers) that the caller sends with its CORS headers.
BlackSheep's middleware (`ProxyApp.middleware`) calls it, and so can a raw-ASGI fast path. With every
control off, `EdgeControls.active` is False and the caller skips everything on one attribute test.

Route groups: `FLAGS` (flags, identities, OFREP, the environment document) and `SDK` (streams, analytics)
are checked against `access.public`, or `access.server_keys` when the key is a server-side key (`ser.`;
that list falls back to `access.public` when unset); `OPERATIONS` (`/metrics`, `/proxy/status`) against
`access.operations`. Health stays open for probes; only its details are kept to `access.operations`
(`EdgeControls.allowed`). Everything else (liveness, the webhook, which is signed, unknown paths) is open.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

import orjson

from proxy.config.settings import SERVER_KEY_PREFIX, Settings
from proxy.http.client_address import ClientAddresses, Networks
from proxy.metrics import prometheus as metrics

SERVER_PREFIX = SERVER_KEY_PREFIX.encode()

Headers = Iterable[tuple[bytes, bytes]]
Client = tuple[str, int] | list[object] | None


class Group(IntEnum):
    OPEN = 0
    FLAGS = 1
    SDK = 2
    OPERATIONS = 3


# route template (as `proxy.http.app.ROUTES` has it) → group; a route not listed is open
ROUTE_GROUPS: dict[str, Group] = {
    "/api/v1/flags/": Group.FLAGS,
    "/api/v1/identities/": Group.FLAGS,
    "/api/v1/environment-document/": Group.FLAGS,
    "/ofrep/v1/evaluate/flags/{key}": Group.FLAGS,
    "/ofrep/v1/evaluate/flags": Group.FLAGS,
    "/api/v1/analytics/flags/": Group.SDK,
    "/sse/environments/{key}/stream": Group.SDK,
    "/metrics": Group.OPERATIONS,
    "/proxy/status": Group.OPERATIONS,
}


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    body: bytes  # JSON that says what was refused and why
    headers: list[tuple[bytes, bytes]]


def _forbidden(address: str, setting: str) -> Refusal:
    message = f"client address {address} is not allowed on this route ({setting})"
    return Refusal(403, orjson.dumps({"status": "forbidden", "message": message}), [])


class EdgeControls:
    def __init__(self, settings: Settings) -> None:
        self.addresses = ClientAddresses(settings.trusted_proxies, settings.forwarded_header.value)
        access = settings.access
        public = Networks(access.public) if access.public is not None else None
        server_keys = Networks(access.server_keys) if access.server_keys is not None else public
        operations = Networks(access.operations) if access.operations is not None else None
        # (list for client keys, list for server keys, the setting named in a refusal of each) per group
        self._lists: dict[Group, tuple[Networks | None, Networks | None, str, str]] = {
            Group.FLAGS: (public, server_keys, "access.public", _server_setting(settings)),
            Group.SDK: (public, server_keys, "access.public", _server_setting(settings)),
            Group.OPERATIONS: (operations, operations, "access.operations", "access.operations"),
        }
        self.access = any(networks is not None for networks in (public, server_keys, operations))
        # The one test callers make: False when no control is on.
        self.active = self.access

    def client(self, client: Client, headers: Headers) -> str:
        """The client address (see `proxy.http.client_address`)."""
        return self.addresses.resolve(client, headers)

    def check(self, group: Group, client: Client, headers: Headers, key: bytes | None) -> Refusal | None:
        """None when the request may go on; else the refusal to send (403)."""
        if group is Group.OPEN or not self.access:
            return None
        address = self.addresses.resolve(client, headers)
        server = key is not None and key.startswith(SERVER_PREFIX)
        public, server_keys, public_setting, server_setting = self._lists[group]
        networks = server_keys if server else public
        if networks is not None and address not in networks:
            setting = server_setting if server else public_setting
            metrics.access_denied[setting] += 1
            return _forbidden(address, setting)
        return None

    def allowed(self, group: Group, client: Client, headers: Headers) -> bool:
        """Whether the client may see what `group` guards without a key (health's details: OPERATIONS)."""
        networks = self._lists[group][0] if group is not Group.OPEN else None
        return networks is None or self.addresses.resolve(client, headers) in networks


def _server_setting(settings: Settings) -> str:
    return "access.server_keys" if settings.access.server_keys is not None else "access.public"
