"""config.json + environment overrides, validated once at start and frozen: `Settings`, how it is loaded,
and how it is shown (masked) in the start-up log and check-config. Its sections are in `sections.py`.

Compatible with Flagsmith's Python proxy: the same keys, aliases and defaults, environment variables
override the file (case-insensitive, nested values as JSON, deep-merged), plus `proxy_key`,
`allow_origins`, `usage_flush_interval_seconds` and a few settings of our own.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from proxy.config.masking import mask_key, mask_url
from proxy.config.sections import (
    AccessSettings,
    Cidr,
    EndpointCaches,
    EnvironmentKeyPair,
    ForwardedHeader,
    HealthCheckSettings,
    IdentityCacheSettings,
    LoggingSettings,
    RateLimitSettings,
    RealtimeSettings,
    ServerSettings,
    WebhookSettings,
)

DEFAULT_API_URL = "https://edge.api.flagsmith.com/api/v1"

log = logging.getLogger("proxy.settings")


class ConfigError(Exception):
    """A configuration problem, reported as one line naming the key; start-up exits with code 2."""


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


def default_config() -> dict[str, Any]:
    """A complete config.json with every key at its default (and one example key pair)."""
    example = {"server_side_key": "ser.your_server_side_key", "client_side_key": "your_client_side_key"}
    data = Settings.model_construct().model_dump(mode="json")
    data["environment_key_pairs"] = [example]
    data["endpoint_caches"] = EndpointCaches().model_dump(mode="json")
    return data
