"""config.json + environment overrides, validated once at start and frozen.

Compatible with Flagsmith's Python proxy: the same keys, aliases and defaults, environment variables
override the file (case-insensitive, nested values as JSON, deep-merged), plus `proxy_key`,
`allow_origins`, `usage_flush_interval_seconds` and a few settings of our own.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_API_URL = "https://edge.api.flagsmith.com/api/v1"
SERVER_KEY_PREFIX = "ser."

log = logging.getLogger("proxy.settings")


class ConfigError(Exception):
    """A configuration problem, reported as one line naming the key; start-up exits with code 2."""


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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        case_sensitive=False,
        frozen=True,
        populate_by_name=True,
        extra="ignore",
        env_nested_delimiter=None,
    )

    environment_key_pairs: list[EnvironmentKeyPair] = Field(default_factory=list)
    api_url: str = DEFAULT_API_URL
    api_poll_frequency_seconds: float = Field(
        default=10, gt=0, validation_alias=AliasChoices("api_poll_frequency_seconds", "api_poll_frequency")
    )
    api_poll_timeout_seconds: float = Field(
        default=5, gt=0, validation_alias=AliasChoices("api_poll_timeout_seconds", "api_poll_timeout")
    )
    # One environment's whole fetch, pages included (the timeout above is per read): a trickling upstream
    # cannot hold a refresh for longer than this.
    api_fetch_deadline_seconds: float = Field(default=30, gt=0)
    max_document_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    endpoint_caches: EndpointCaches | None = None
    allow_origins: list[str] = Field(default_factory=lambda: ["*"])
    logging: LoggingSettings = LoggingSettings()
    server: ServerSettings = ServerSettings()
    health_check: HealthCheckSettings = HealthCheckSettings()
    proxy_key: str | None = Field(default=None, min_length=1)
    usage_flush_interval_seconds: int = Field(default=60, ge=1)
    analytics_flush_interval_seconds: float = Field(default=10, gt=0)
    max_request_body_bytes: int = Field(default=64 * 1024, ge=1024)
    request_body_timeout_seconds: float = Field(default=10, gt=0)
    max_concurrent_fetches: int = Field(default=8, ge=1)
    # A leader whose heartbeat stops this long (a hung loop, SIGSTOP) is killed and replaced.
    leader_heartbeat_timeout_seconds: float = Field(default=10, gt=0)
    shared_memory_dir: str = "/dev/shm"
    # Bytes of documents the area may hold (e.g. the container's /dev/shm size); None: whatever is free.
    shared_memory_max_bytes: int | None = Field(default=None, ge=1024)
    # Persisted snapshots of the last good documents (a directory, e.g. a volume shared by replicas, or a
    # Redis URL): a cold start serves from them until upstream answers. One of the two, or neither.
    snapshot_dir: str | None = Field(default=None, min_length=1)
    snapshot_redis_url: str | None = Field(default=None, min_length=1)
    # A Redis shared by the replicas: they tell each other of changes (pub/sub) and share the webhook replay
    # window; it also holds the snapshots unless snapshot_dir or snapshot_redis_url says otherwise.
    redis_url: str | None = Field(default=None, min_length=1)
    # When set, GET /proxy/status needs `Authorization: Bearer <token>`; it then also shows error texts.
    status_token: str | None = Field(default=None, min_length=1)
    realtime: RealtimeSettings = RealtimeSettings()
    webhook: WebhookSettings = WebhookSettings()
    # Proxy-follows-proxy: the base URL of an upstream edge proxy's stream (e.g. `http://proxy-a:8000/`);
    # the leader follows it and refreshes an environment as soon as it changes there, instead of waiting
    # for its poll. None: poll only.
    upstream_stream_url: str | None = None
    # Edge controls. The client address is the socket's peer, unless the peer is in `trusted_proxies`: then
    # the rightmost address in `forwarded_header` that is not itself a trusted proxy.
    trusted_proxies: list[Cidr] = Field(default_factory=list)
    forwarded_header: ForwardedHeader = ForwardedHeader.x_forwarded_for
    access: AccessSettings = AccessSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        value = value.strip()
        scheme = value.split(":", 1)[0].lower() if ":" in value else ""
        if scheme not in ("http", "https", "file"):
            raise ValueError(f"must be an http://, https:// or file:// URL, not {mask_url(value)!r}")
        if scheme == "file":
            directory = file_source_dir(value)
            if not directory.is_dir():
                raise ValueError(f"file source directory {str(directory)!r} does not exist")
            return value
        # A trailing slash would give `//environment-document/` (a Python-proxy quirk we fix).
        return value.rstrip("/")

    @field_validator("upstream_stream_url")
    @classmethod
    def _stream_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if value.split(":", 1)[0].lower() not in ("http", "https"):
            raise ValueError(f"must be an http:// or https:// URL, not {mask_url(value)!r}")
        return value.rstrip("/") + "/"

    @model_validator(mode="after")
    def _unique_keys(self) -> Settings:
        seen: set[str] = set()
        for index, pair in enumerate(self.environment_key_pairs):
            for key in (pair.server_side_key, pair.client_side_key):
                if key in seen:
                    raise ValueError(f"environment_key_pairs.{index}: key {mask_key(key)} is configured more than once")
                seen.add(key)
        if not self.environment_key_pairs and not self.proxy_key:
            raise ValueError("environment_key_pairs: at least one pair is required (or a proxy_key)")
        if self.snapshot_dir and self.snapshot_redis_url:
            raise ValueError("snapshot_dir, snapshot_redis_url: set one snapshot store, not both")
        for name in ("snapshot_redis_url", "redis_url"):
            url = getattr(self, name)
            if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
                raise ValueError(f"{name}: must be a redis://, rediss:// or unix:// URL")
        if self.proxy_key and self.api_url.lower().startswith("file:"):
            raise ValueError("proxy_key: proxy-config discovery needs an http(s) api_url, not a file source")
        return self

    @property
    def snapshot_redis(self) -> str | None:
        """Where snapshots go in Redis: snapshot_redis_url, else redis_url unless snapshot_dir is set."""
        return self.snapshot_redis_url or (None if self.snapshot_dir else self.redis_url)

    @property
    def shared_redis(self) -> str | None:
        """The Redis the replicas share changes and webhook deliveries through."""
        return self.redis_url or self.snapshot_redis_url

    @property
    def identity_cache(self) -> IdentityCacheSettings:
        return (self.endpoint_caches or EndpointCaches()).identities

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence as in the Python proxy: init kwargs > environment variables > config file.
        return (init_settings, env_settings, _FileSource(settings_cls))


# The config file `load_settings` read, for the one Settings construction it runs (a context variable, so
# nothing global is mutated and concurrent constructions cannot see each other's file).
_file_data: ContextVar[dict[str, Any]] = ContextVar("config_file_data", default={})  # noqa: B039 - never mutated


class _FileSource(PydanticBaseSettingsSource):
    """Feeds the already-loaded config file (see `load_settings`) to pydantic-settings."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_data.get())


def file_source_dir(api_url: str) -> Path:
    """`file:///abs/dir` or `file:relative/dir` → the directory holding `<server key>.json` files."""
    rest = api_url.split(":", 1)[1]
    if rest.startswith("//"):
        rest = rest[2:]
    return Path(rest)


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    found = (os.environ if environ is None else environ).get("CONFIG_PATH")
    return Path(found or "config.json")


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:  # unreadable, or in a folder we may not enter
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object, not {type(data).__name__}")
    return data


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read, merge and validate the configuration; raise ConfigError with one line per problem."""
    path = config_path() if path is None else path
    data = read_config_file(path)
    token = _file_data.set(data)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    finally:
        _file_data.reset(token)
    for warning in config_warnings(data, settings):
        log.warning(warning)
    return settings


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        key = ".".join(str(part) for part in error["loc"]) or "config"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "json_invalid":
            message = "invalid JSON in the environment variable"
        lines.append(f"config error: {key}: {message}")
    return "\n".join(lines)


_KNOWN_TOP_LEVEL = {
    *Settings.model_fields,
    "api_poll_frequency",
    "api_poll_timeout",
}


def config_warnings(data: dict[str, Any], settings: Settings) -> list[str]:
    warnings = [f"config: unknown key {key!r} ignored" for key in data if key not in _KNOWN_TOP_LEVEL]
    if settings.server.reload:
        warnings.append("config: server.reload has no effect (no code reloading in production serving)")
    if "timeout_keep_alive" in (data.get("server") or {}):
        warnings.append(
            "config: server.timeout_keep_alive has no Granian equivalent; keep-alive is on/off in granian.toml"
        )
    if settings.server.proxy_headers:
        warnings.append("config: server.proxy_headers has no effect: list the proxies in trusted_proxies instead")
    if settings.endpoint_caches and settings.endpoint_caches.flags.use_cache:
        warnings.append("config: endpoint_caches.flags has no effect: flag responses are always pre-encoded")
    return warnings


def mask_key(key: str) -> str:
    """Enough of a key to tell keys apart in logs, never enough to use it."""
    prefix = SERVER_KEY_PREFIX if key.startswith(SERVER_KEY_PREFIX) else ""
    rest = key[len(prefix) :]
    if len(rest) <= 6:
        return prefix + "***"
    return f"{prefix}{rest[:2]}…{rest[-2:]}"


def secret_variables(environ: Mapping[str, str]) -> list[str]:
    """The names in `environ` that pydantic-settings reads as settings (any case, aliases too), plus
    Granian's key-file password: what `serve` removes before starting children, which get their settings
    from the area."""
    names = {"granian_ssl_keyfile_password"}
    for name, field in Settings.model_fields.items():
        names.add(name)
        if isinstance(field.validation_alias, AliasChoices):
            names.update(str(choice) for choice in field.validation_alias.choices)
    return [variable for variable in environ if variable.lower() in names]


SUMMARY_ITEMS = 3  # of a long list, the start-up log shows this many


def settings_summary(settings: Settings) -> str:
    """The start-up log's view of the settings: masked, each long list cut to its first items and a count
    (10,000 key pairs printed whole made one line of ~1 MB)."""
    data = masked_settings(settings)
    for key, value in data.items():
        if isinstance(value, list) and len(value) > SUMMARY_ITEMS:
            data[key] = [*value[:SUMMARY_ITEMS], f"… and {len(value) - SUMMARY_ITEMS} more"]
    shown = json.dumps(data, ensure_ascii=False)
    return f"{len(settings.environment_key_pairs)} environment key pair(s), settings: {shown}"


URL_SETTINGS = ("api_url", "snapshot_redis_url", "redis_url", "upstream_stream_url")  # each may carry credentials


def masked_settings(settings: Settings) -> dict[str, Any]:
    data = settings.model_dump(mode="json")
    data["environment_key_pairs"] = [
        {"server_side_key": mask_key(p["server_side_key"]), "client_side_key": mask_key(p["client_side_key"])}
        for p in data["environment_key_pairs"]
    ]
    if data.get("proxy_key"):
        data["proxy_key"] = mask_key(data["proxy_key"])
    if (data.get("webhook") or {}).get("secret"):
        data["webhook"]["secret"] = "***"
    for key in URL_SETTINGS:
        if data.get(key):
            data[key] = mask_url(data[key])
    if data.get("status_token"):
        data["status_token"] = "***"
    return data


# Query or fragment parameters whose value is a credential, by any name a client library uses
# (`password`, `sentinel_password`, `access_token`, `api_key`, `X-Amz-Signature`, `auth`…): over-masking
# a harmless one costs nothing, printing a secret cannot be undone.
_SECRET_PARAMETER = re.compile(r"pass|pwd|token|secret|key|auth|sig|credential", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,;:)]")


def mask_url(url: str) -> str:
    """A URL safe to show: user-info (`user:pw@`, `:pw@`, `token@`) → `***@`, and the value of every
    credential-like query or fragment parameter → `***`. What carries no credential is left as written."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable (e.g. an unclosed IPv6 bracket): show none of it
        return "***"
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    masked = parts._replace(
        netloc=netloc, query=_mask_parameters(parts.query), fragment=_mask_parameters(parts.fragment)
    )
    return url if masked == parts else urlunsplit(masked)


def _mask_parameters(text: str) -> str:
    if "=" not in text:
        return text
    pieces = []
    for piece in text.split("&"):
        name, equals, _ = piece.partition("=")
        pieces.append(f"{name}=***" if equals and _SECRET_PARAMETER.search(unquote_plus(name)) else piece)
    return "&".join(pieces)


def mask_urls_in(text: str) -> str:
    """`text` (an exception's message, say) with every URL in it masked by `mask_url`."""
    return _URL_IN_TEXT.sub(lambda match: mask_url(match.group()), text)


SECRET_GRANIAN_OPTIONS = ("ssl_keyfile_password",)


def masked_options(options: dict[str, Any]) -> dict[str, Any]:
    return {key: ("***" if key in SECRET_GRANIAN_OPTIONS and value else value) for key, value in options.items()}


def default_config() -> dict[str, Any]:
    """A complete config.json with every key at its default (and one example key pair)."""
    example = {"server_side_key": "ser.your_server_side_key", "client_side_key": "your_client_side_key"}
    data = Settings.model_construct().model_dump(mode="json")
    data["environment_key_pairs"] = [example]
    data["endpoint_caches"] = EndpointCaches().model_dump(mode="json")
    return data
