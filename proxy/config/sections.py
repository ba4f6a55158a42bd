"""The sections of the configuration (`server`, `logging`, `health_check`, …): each a frozen model with its
defaults and checks. `settings.py` assembles them into `Settings` and loads it."""

from __future__ import annotations

import ipaddress
import math
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator

SERVER_KEY_PREFIX = "ser."


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")


class EnvironmentKeyPair(_Frozen):
    server_side_key: str
    client_side_key: str

    @field_validator("server_side_key", "client_side_key", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("server_side_key")
    @classmethod
    def _server_key(cls, value: str) -> str:
        if not value.startswith(SERVER_KEY_PREFIX):
            raise ValueError(f"a server-side key must start with '{SERVER_KEY_PREFIX}'")
        if len(value) == len(SERVER_KEY_PREFIX):
            raise ValueError("a server-side key needs characters after 'ser.'")
        return value

    @field_validator("client_side_key")
    @classmethod
    def _client_key(cls, value: str) -> str:
        if not value:
            raise ValueError("a client-side key must not be empty")
        if value.startswith(SERVER_KEY_PREFIX):
            raise ValueError(f"a client-side key must not start with '{SERVER_KEY_PREFIX}'")
        return value


class CacheSettings(_Frozen):
    use_cache: bool = False
    cache_max_size: int = Field(default=128, ge=1)


class IdentityCacheSettings(CacheSettings):
    # On by default (docs/DESIGN.md): the LRU holds encoded identity responses, bounded in entries and bytes.
    use_cache: bool = True
    cache_max_size: int = Field(default=4096, ge=1)
    cache_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Per worker: environments whose identity evaluator is kept (the least recently used dropped beyond it);
    # the others build theirs on their next identity request, in a few milliseconds. Not a response cache:
    # it applies with use_cache off too.
    compiled_environments: int = Field(default=256, ge=1)


class EndpointCaches(_Frozen):
    # `flags` is accepted for compatibility; flag lists are always pre-encoded, so it changes nothing.
    flags: CacheSettings = CacheSettings()
    identities: IdentityCacheSettings = IdentityCacheSettings()


class LogFormat(StrEnum):
    generic = "generic"
    json = "json"


class LogLevel(StrEnum):
    CRITICAL = "CRITICAL"
    ERROR = "ERROR"
    WARNING = "WARNING"
    INFO = "INFO"
    DEBUG = "DEBUG"
    NOTSET = "NOTSET"


class LoggingSettings(_Frozen):
    enable_access_log: bool = False
    log_format: LogFormat = LogFormat.generic
    log_level: LogLevel = LogLevel.INFO
    log_event_field_name: str = "message"
    colours: bool = Field(default=False, validation_alias=AliasChoices("colours", "colors"))
    override: dict[str, Any] = Field(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class ServerSettings(_Frozen):
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    # The hot routes served straight from ASGI (proxy/http/fast_path.py); false: every request through
    # BlackSheep, the same answers more slowly (for comparison).
    fast_path: bool = True
    # Python-proxy keys with no Granian equivalent: accepted, warned about at start.
    reload: bool = False
    proxy_headers: bool = False
    timeout_keep_alive: int = Field(default=5, gt=0)

    @field_validator("host")
    @classmethod
    def _ip(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"must be an IP address (IPv4 or IPv6), not {value!r}") from None
        return value


class ReadinessMode(StrEnum):
    # `any_stale`: one stale environment fails readiness (both peers). `all_stale`: readiness fails only
    # when no environment is fresh, so one revoked key does not take every replica out of the balancer.
    any_stale = "any_stale"
    all_stale = "all_stale"


class HealthCheckSettings(_Frozen):
    environment_update_grace_period_seconds: float | None = Field(default=30, ge=0)
    fail_readiness_when: ReadinessMode = ReadinessMode.any_stale
    # Health is unauthenticated: by default it names an error's kind only; the full text (which may name
    # internal hosts) and the answering worker's pid only when this is on. Logs and metrics always have them.
    show_details: bool = False
    # An environment served from a persisted snapshot (no upstream answer yet) counts as ready while the
    # snapshot is younger than this (seconds; None: any age); false: only upstream answers make it ready.
    snapshot_counts_as_ready: bool = True
    snapshot_max_age_seconds: float | None = Field(default=7 * 24 * 3600, gt=0)


class RealtimeSettings(_Frozen):
    """The SDKs' server-sent-events stream (`/sse/environments/{client key}/stream`)."""

    enabled: bool = True
    # A comment line this often keeps idle connections open through load balancers (most cut at 60 s).
    keepalive_seconds: float = Field(default=20, ge=1, le=300)
    # Per worker: past it a new stream is a 503 (the SDKs retry), so idle streams cannot exhaust memory.
    max_streams_per_worker: int = Field(default=10_000, ge=1)
    # A stream is closed after this long (the SDKs reconnect at once), so clients rebalance across replicas.
    max_lifetime_seconds: float = Field(default=3600, ge=1)


class WebhookSettings(_Frozen):
    """`POST /proxy/webhooks/flagsmith`: Flagsmith environment webhooks trigger a refresh. Off without a secret."""

    secret: str | None = Field(default=None, min_length=8)
    # Refreshes of one environment started by webhooks are at least this far apart (a storm is coalesced).
    min_refresh_interval_seconds: float = Field(default=1.0, ge=0)
    # A payload whose `data.timestamp` is older than this, or a signature seen within it, is a 400.
    replay_window_seconds: float = Field(default=300, ge=1)


def _cidr(value: str) -> str:
    """A network in CIDR notation (a bare address is its own /32 or /128), normalized."""
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"not an IP network in CIDR notation (e.g. 10.0.0.0/8, 2001:db8::/32): {value!r}") from None


Cidr = Annotated[str, AfterValidator(_cidr)]


class AccessSettings(_Frozen):
    """Network allow lists per route group (CIDRs). None: any address; an empty list: none."""

    # flags, identities, OFREP, streams and analytics with a client-side key (or none)
    public: list[Cidr] | None = None
    # anything a server-side key unlocks (those routes with a `ser.` key, the environment document);
    # None: the same list as `public`
    server_keys: list[Cidr] | None = None
    # /metrics, /proxy/status, and health's details (health itself, liveness and readiness stay open)
    operations: list[Cidr] | None = None


class RateLimit(_Frozen):
    requests_per_second: float = Field(gt=0)
    # requests allowed at once after a quiet spell; None: one second's worth
    burst: int | None = Field(default=None, ge=1)

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.requests_per_second))


class RateLimitSettings(_Frozen):
    """Token buckets on the flag routes (flags, identities, OFREP, the environment document), shared by
    every worker of a replica. None: no limit."""

    per_client_address: RateLimit | None = None
    per_key: RateLimit | None = None  # per environment key (client or server), whatever the address
    # buckets per limit (24 bytes each, in the shared-memory area): memory is bounded whatever the number of
    # clients; past it, the fullest (most idle) buckets are reused
    table_entries: int = Field(default=65_536, ge=64, le=16 * 1024 * 1024)


class ForwardedHeader(StrEnum):
    # The header the trusted proxies append the client's address to; the other one is ignored, since a
    # client could write any address into it.
    x_forwarded_for = "x-forwarded-for"
    forwarded = "forwarded"
