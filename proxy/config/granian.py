"""Granian's options, from `granian.toml` + environment + CLI. Granian reads no config file itself.

Keys mirror Granian's own option names (`granian --help`, dashes as underscores). Precedence, highest
first: CLI flags, environment variables (`GRANIAN_<KEY>`, and `WEB_CONCURRENCY` for the worker count as
the Python proxy honours it), config.json's `server.host`/`server.port` when set explicitly, granian.toml,
defaults. Unknown keys and bad values stop start-up with a message naming the key.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from proxy.config.settings import ConfigError

GRANIAN_CONFIG_ENV = "EDGE_PROXY_GRANIAN_CONFIG"


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit():
            raise ValueError(f"expected an integer, got {value!r}")
        number = int(value)
        if number < minimum or (maximum is not None and number > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"must be {bound}, got {number}")
        return number

    return parse


def _float(value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"must be positive, got {number}")
    return number


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value)
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value in (None, "") else parse(value)


# key → (parser, default). A worker count of 0 means "the CPUs this process may use".
OPTIONS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "host": (_str, "0.0.0.0"),
    "port": (_int(1, 65535), 8000),
    "workers": (_int(0), 0),
    "backlog": (_int(128), 1024),
    "backpressure": (_optional(_int(1)), None),
    "http": (_choice("auto", "1", "2"), "auto"),
    "http1_keep_alive": (_bool, True),
    "http1_header_read_timeout": (_int(1, 60_000), 30_000),
    "http2_max_concurrent_streams": (_int(1), 200),
    "http2_keep_alive_interval": (_optional(_int(1)), None),
    "ssl_certificate": (_optional(_str), None),
    "ssl_keyfile": (_optional(_str), None),
    "ssl_keyfile_password": (_optional(_str), None),
    "ssl_protocol_min": (_choice("tls1.2", "tls1.3"), "tls1.3"),
    "respawn_failed_workers": (_bool, True),
    "respawn_interval": (_float, 3.5),
    "workers_kill_timeout": (_optional(_int(1, 1800)), 20),
    "workers_lifetime": (_optional(_int(60)), None),
    "workers_max_rss": (_optional(_int(1)), None),
    "access_log": (_bool, False),
    "access_log_fmt": (_optional(_str), None),
    "runtime_threads": (_int(1), 1),
    "runtime_mode": (_choice("auto", "mt", "st"), "auto"),
    "task_impl": (_choice("asyncio", "rust"), "asyncio"),
    "loop": (_choice("auto", "asyncio", "uvloop"), "uvloop"),
    "metrics": (_bool, False),
    "metrics_address": (_str, "127.0.0.1"),
    "metrics_port": (_int(1, 65535), 9090),
}


@dataclass(frozen=True, slots=True)
class GranianOptions:
    """The validated options, typed: what `serve` hands to Granian. Field names are OPTIONS' keys."""

    host: str
    port: int
    workers: int
    backlog: int
    backpressure: int | None
    http: Literal["auto", "1", "2"]
    http1_keep_alive: bool
    http1_header_read_timeout: int
    http2_max_concurrent_streams: int
    http2_keep_alive_interval: int | None
    ssl_certificate: str | None
    ssl_keyfile: str | None
    ssl_keyfile_password: str | None
    ssl_protocol_min: Literal["tls1.2", "tls1.3"]
    respawn_failed_workers: bool
    respawn_interval: float
    workers_kill_timeout: int | None
    workers_lifetime: int | None
    workers_max_rss: int | None
    access_log: bool
    access_log_fmt: str | None
    runtime_threads: int
    runtime_mode: Literal["auto", "mt", "st"]
    task_impl: Literal["asyncio", "rust"]
    loop: Literal["auto", "asyncio", "uvloop"]
    metrics: bool
    metrics_address: str
    metrics_port: int

    def __getitem__(self, key: str) -> Any:  # options["port"] still reads (tests, logs)
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (v2, or v1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(cgroup: Path) -> float | None:
    """The CPU quota in CPUs (a container's `--cpus`, a pod's limit), or None when unlimited or unknown."""
    try:
        limit, every = (cgroup / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "150000 100000"
        return None if limit == "max" else int(limit) / int(every)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 means unlimited
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def find_config_file(cli_path: str | None, environ: Mapping[str, str]) -> Path | None:
    path = cli_path or environ.get(GRANIAN_CONFIG_ENV)
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"granian config {path}: no such file")
        return Path(path)
    default = Path("granian.toml")
    return default if default.is_file() else None


def load_granian_options(
    path: Path | None,
    environ: Mapping[str, str],
    cli: Mapping[str, Any],
    server_overrides: Mapping[str, Any],
) -> GranianOptions:
    """Merge every layer and validate each key once, where its value came from named in any error."""
    merged: dict[str, tuple[Any, str]] = {key: (default, "default") for key, (_, default) in OPTIONS.items()}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        for key, value in data.items():
            if key not in OPTIONS:
                raise ConfigError(f"{path}: unknown key {key!r} (valid keys: {', '.join(OPTIONS)})")
            merged[key] = (value, str(path))
    for key, value in server_overrides.items():
        merged[key] = (value, f"config.json server.{key}")
    if "WEB_CONCURRENCY" in environ:
        merged["workers"] = (environ["WEB_CONCURRENCY"], "WEB_CONCURRENCY")
    for key in OPTIONS:
        env_name = f"GRANIAN_{key.upper()}"
        if env_name in environ:
            merged[key] = (environ[env_name], env_name)
    for key, value in cli.items():
        if value is not None:
            merged[key] = (value, f"--{key.replace('_', '-')}")
    options: dict[str, Any] = {}
    for key, (value, origin) in merged.items():
        try:
            options[key] = OPTIONS[key][0](value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{origin}: {key}: {exc}") from None
    if options["workers"] == 0:
        options["workers"] = available_cpus()
    if bool(options["ssl_certificate"]) != bool(options["ssl_keyfile"]):
        raise ConfigError("granian: ssl_certificate and ssl_keyfile must be given together")
    return GranianOptions(**options)
