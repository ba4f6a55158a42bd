"""`edge-proxy serve | check-config | render-config | health`, and `--version`.

A configuration problem prints one line per problem, naming the key, and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.config.granian import GranianOptions, find_config_file, load_granian_options
from proxy.config.logs import configure_logging
from proxy.config.masking import mask_url, masked_options
from proxy.config.settings import (
    ConfigError,
    Settings,
    default_config,
    load_settings,
    masked_settings,
    settings_summary,
)
from proxy.metrics.directory import point_metrics_at

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_SERVER_KEY = "ser.demo_server_key"
DEMO_CLIENT_KEY = "demo_client_key"

log = logging.getLogger("proxy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-proxy", description="Flagsmith-compatible edge proxy")
    parser.add_argument("--version", action="version", version=f"edge-proxy {__version__}")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="serve the proxy (the default command)")
    serve.add_argument("--host", help="address to bind (overrides granian.toml and config.json)")
    serve.add_argument("--port", type=int, help="port to bind")
    serve.add_argument("--workers", type=int, help="worker processes (0: the CPUs this process may use)")
    serve.add_argument("--granian-config", help="path of granian.toml (default: ./granian.toml if present)")
    serve.add_argument(
        "--demo", action="store_true", help="serve the bundled demo environment (no Flagsmith account needed)"
    )
    check = commands.add_parser("check-config", help="validate the configuration and print it, keys masked")
    check.add_argument("--granian-config", help="path of granian.toml")
    commands.add_parser("render-config", help="print a complete default config.json")
    health = commands.add_parser("health", help="probe a running proxy's readiness (for container health checks)")
    health.add_argument("--url", default="http://127.0.0.1:8000/proxy/health/readiness")
    health.add_argument("--timeout", type=float, default=3.0)
    return parser


def _demo_overrides() -> dict[str, Any]:
    return {
        "environment_key_pairs": [{"server_side_key": DEMO_SERVER_KEY, "client_side_key": DEMO_CLIENT_KEY}],
        "api_url": f"file://{DEMO_DIR}",
    }


def _server_overrides(settings: Settings) -> dict[str, Any]:
    """config.json's (or the environment's) server.host / server.port, only when set explicitly."""
    return {key: getattr(settings.server, key) for key in ("host", "port") if key in settings.server.model_fields_set}


def _load(args: argparse.Namespace) -> tuple[Settings, GranianOptions]:
    overrides = _demo_overrides() if getattr(args, "demo", False) else {}
    settings = load_settings(**overrides)
    cli = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "workers": getattr(args, "workers", None),
    }
    options = load_granian_options(
        find_config_file(args.granian_config, os.environ), os.environ, cli, _server_overrides(settings)
    )
    return settings, options


def _serve(args: argparse.Namespace) -> int:
    settings, options = _load(args)
    configure_logging(settings.logging)
    from proxy.area.control import Area, AreaError
    from proxy.area.names import METRICS, area_path

    area = Area(area_path(settings.shared_memory_dir, options.port))
    try:
        area.create()
    except AreaError as exc:
        print(f"edge-proxy: {exc}", file=sys.stderr)
        return 2
    taken = _port_taken(options.host, options.port)
    if taken is not None:  # another program's (Granian would exit with a Rust backtrace)
        area.remove()
        print(f"edge-proxy: cannot listen on {options.host}:{options.port}: {taken}", file=sys.stderr)
        return 2
    point_metrics_at(area.path / METRICS)
    log.info("edge-proxy %s, %s", __version__, settings_summary(settings))
    log.info("granian: %s", json.dumps(masked_options(options.as_dict())))
    if args.demo:
        _print_demo_help(options.port)
    from proxy.supervisor.server import serve

    return serve(settings, options, area)


def _port_taken(host: str, port: int) -> str | None:
    """Why the address cannot be bound, or None. Granian's workers bind with SO_REUSEPORT, so a probe
    without it fails exactly when someone else holds the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _print_demo_help(port: int) -> None:
    base = f"http://localhost:{port}"
    print(
        "\nServing the bundled demo environment. Try:\n"
        f"  curl -s {base}/api/v1/flags/ -H 'X-Environment-Key: {DEMO_CLIENT_KEY}'\n"
        f"  curl -s '{base}/api/v1/flags/?feature=banner_text' -H 'X-Environment-Key: {DEMO_CLIENT_KEY}'\n"
        f"  curl -s {base}/api/v1/identities/ -H 'X-Environment-Key: {DEMO_CLIENT_KEY}' "
        "-H 'Content-Type: application/json' "
        """-d '{"identifier":"user-42","traits":[{"trait_key":"plan","trait_value":"premium"}]}'\n"""
        f"  curl -s {base}/proxy/health\n",
        flush=True,
    )


def _health(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(errors="replace"))
    except (urllib.error.URLError, OSError) as exc:
        print(f"edge-proxy health: {mask_url(args.url)}: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    if args.command is None:
        args = _parser().parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    try:
        if command == "render-config":
            print(json.dumps(default_config(), indent=2))
            return 0
        if command == "health":
            return _health(args)
        if command == "check-config":
            settings, options = _load(args)
            printed = {"settings": masked_settings(settings), "granian": masked_options(options.as_dict())}
            print(json.dumps(printed, indent=2))
            return 0
        return _serve(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
