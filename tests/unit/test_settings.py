"""Configuration: the Python proxy's keys, aliases, defaults and environment overrides; clear errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy.config.granian import available_cpus, load_granian_options
from proxy.config.masking import mask_key, mask_url, mask_urls_in
from proxy.config.settings import (
    ConfigError,
    Settings,
    default_config,
    load_settings,
    secret_variables,
    settings_summary,
)
from tests.support import EDGE_PROXY, EXAMPLES, ROOT

PAIR = {"server_side_key": "ser.abc123", "client_side_key": "client123"}


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "config.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper() in {field.upper() for field in Settings.model_fields} | {"API_POLL_FREQUENCY"}:
            monkeypatch.delenv(name)


def test_defaults_match_the_python_proxy(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"environment_key_pairs": [PAIR]}))
    assert settings.api_url == "https://edge.api.flagsmith.com/api/v1"
    assert settings.api_poll_frequency_seconds == 10
    assert settings.api_poll_timeout_seconds == 5
    assert settings.allow_origins == ["*"]
    assert settings.server.host == "0.0.0.0" and settings.server.port == 8000
    assert settings.health_check.environment_update_grace_period_seconds == 30
    assert settings.logging.log_level == "INFO" and settings.logging.log_format == "generic"
    assert settings.identity_cache.use_cache is True


def test_the_captured_reference_config_loads() -> None:
    settings = load_settings(EXAMPLES / "proxy_config.json")
    assert [p.client_side_key for p in settings.environment_key_pairs] == ["env_client_key_1", "env_client_key_2"]
    assert settings.server.port == 18000


def test_aliases_and_trailing_slash(tmp_path: Path) -> None:
    config = {
        "environment_key_pairs": [PAIR],
        "api_poll_frequency": 3,
        "api_poll_timeout": 2,
        "api_url": "https://flags.example.com/api/v1/",
        "logging": {"colors": True},
    }
    settings = load_settings(write(tmp_path, config))
    assert settings.api_poll_frequency_seconds == 3
    assert settings.api_poll_timeout_seconds == 2
    assert settings.api_url == "https://flags.example.com/api/v1"  # no `//environment-document/`
    assert settings.logging.colours is True


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {"environment_key_pairs": [PAIR], "logging": {"log_format": "json"}})
    monkeypatch.setenv("api_poll_frequency_seconds", "1")
    monkeypatch.setenv("LOGGING", '{"log_level": "debug"}')
    monkeypatch.setenv("SERVER", '{"port": 18009}')
    settings = load_settings(path)
    assert settings.api_poll_frequency_seconds == 1
    assert settings.logging.log_level == "DEBUG"
    assert settings.logging.log_format == "json"  # deep-merged with the file's logging object
    assert settings.server.port == 18009


def test_environment_alone_is_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT_KEY_PAIRS", json.dumps([PAIR]))
    settings = load_settings(tmp_path / "missing.json")
    assert settings.environment_key_pairs[0].client_side_key == "client123"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "environment_key_pairs: at least one pair is required"),
        ({"environment_key_pairs": [{**PAIR, "server_side_key": "abc"}]}, "server_side_key: a server-side key must"),
        ({"environment_key_pairs": [{**PAIR, "client_side_key": "ser.x"}]}, "client_side_key: a client-side key must"),
        ({"environment_key_pairs": [PAIR, PAIR]}, "is configured more than once"),
        ({"environment_key_pairs": [PAIR], "api_poll_frequency_seconds": "often"}, "api_poll_frequency_seconds:"),
        ({"environment_key_pairs": [PAIR], "api_poll_frequency_seconds": 0}, "api_poll_frequency_seconds:"),
        ({"environment_key_pairs": [PAIR], "api_url": "ftp://x"}, "api_url: must be an http://"),
        ({"environment_key_pairs": [PAIR], "server": {"host": "localhost"}}, "server.host: must be an IP address"),
        ({"environment_key_pairs": [PAIR], "logging": {"log_level": "LOUD"}}, "logging.log_level:"),
        ({"environment_key_pairs": [PAIR], "proxy_key": ""}, "proxy_key:"),
        ({"environment_key_pairs": [PAIR], "usage_flush_interval_seconds": 0}, "usage_flush_interval_seconds:"),
        ("{not json", "invalid JSON at line 1"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, config: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, config))
    assert message in str(error.value)
    assert "Traceback" not in str(error.value)


def test_invalid_environment_override_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_POLL_TIMEOUT_SECONDS", "-1")
    with pytest.raises(ConfigError, match="api_poll_timeout_seconds"):
        load_settings(write(tmp_path, {"environment_key_pairs": [PAIR]}))


def test_unknown_keys_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    load_settings(
        write(tmp_path, {"environment_key_pairs": [PAIR], "api_pol_frequency": 5, "server": {"reload": True}})
    )
    assert "unknown key 'api_pol_frequency'" in caplog.text
    assert "server.reload has no effect" in caplog.text


def test_rendered_default_config_is_complete_and_valid(tmp_path: Path) -> None:
    rendered = default_config()
    assert set(Settings.model_fields) <= set(rendered)
    assert load_settings(write(tmp_path, rendered)).environment_key_pairs


def test_keys_are_masked() -> None:
    assert mask_key("ser.abcdefghij") == "ser.ab…ij"
    assert mask_key("client_abcdef") == "cl…ef"
    assert "abcdefghij" not in mask_key("ser.abcdefghij")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://h:6379/0?password=pw", "redis://h:6379/0?password=***"),
        ("redis://:pw@h:6379", "redis://***@h:6379"),
        ("redis://user:pw@h/0", "redis://***@h/0"),
        ("https://tok@h/api/v1", "https://***@h/api/v1"),
        ("unix://:pw@/run/redis.sock?db=0", "unix://***@/run/redis.sock?db=0"),
        (
            "rediss://h/0?ssl_cert_reqs=none&Sentinel_Password=pw",
            "rediss://h/0?ssl_cert_reqs=none&Sentinel_Password=***",
        ),
        ("https://h/x?PWD=pw&Token=pw&access_token=pw", "https://h/x?PWD=***&Token=***&access_token=***"),
        ("https://h/x?api%5Fkey=pw&client_secret=pw&auth=pw", "https://h/x?api%5Fkey=***&client_secret=***&auth=***"),
        ("https://h/x?X-Amz-Signature=pw&X-Amz-Date=1", "https://h/x?X-Amz-Signature=***&X-Amz-Date=1"),
        ("https://h/cb#access_token=pw&state=1", "https://h/cb#access_token=***&state=1"),
        ("https://h/api/v1", "https://h/api/v1"),
        ("file:///srv/documents", "file:///srv/documents"),
        ("http://[::1", "***"),
    ],
)
def test_every_credential_a_url_can_carry_is_masked(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert mask_urls_in(f"Error connecting to {url}. Refused") == f"Error connecting to {masked}. Refused"


def test_a_rejected_url_is_masked_in_the_config_error(tmp_path: Path) -> None:
    write(tmp_path, {"environment_key_pairs": [PAIR], "api_url": "ftp://user:pw-4711@h/x"})
    with pytest.raises(ConfigError) as error:
        load_settings(tmp_path / "config.json")
    assert "pw-4711" not in str(error.value) and "ftp://***@h/x" in str(error.value)


def test_the_environment_variables_read_as_settings_are_found_in_any_case() -> None:
    environ = {"Status_Token": "t", "API_POLL_FREQUENCY": "5", "webhook": "{}", "GRANIAN_SSL_KEYFILE_PASSWORD": "p"}
    environ |= {"CONFIG_PATH": "/c.json", "HOME": "/root", "GRANIAN_WORKERS": "2"}
    assert sorted(secret_variables(environ)) == sorted(
        ["Status_Token", "API_POLL_FREQUENCY", "webhook", "GRANIAN_SSL_KEYFILE_PASSWORD"]
    )


def test_the_start_up_summary_cuts_long_lists() -> None:
    pairs = [{"server_side_key": f"ser.server_{n:04d}", "client_side_key": f"client_{n:04d}"} for n in range(1000)]
    summary = settings_summary(Settings(environment_key_pairs=pairs, allow_origins=["https://a", "https://b"]))
    assert summary.startswith("1000 environment key pair(s), settings: ") and len(summary) < 2000
    assert "… and 997 more" in summary and '["https://a", "https://b"]' in summary
    assert "server_0999" not in summary and "client_0000" not in summary


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GRANIAN_")}
    environment.update({"CONFIG_PATH": str(tmp_path / "config.json"), **(env or {})})
    return subprocess.run(
        [EDGE_PROXY, *args], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60
    )


def test_bad_config_stops_start_up_with_exit_code_2(tmp_path: Path) -> None:
    write(tmp_path, {"environment_key_pairs": [{**PAIR, "server_side_key": "nope"}]})
    result = run_cli(tmp_path, "serve", "--port", "1")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "config error: environment_key_pairs.0.server_side_key: a server-side key must start with 'ser.'"
    )


def test_check_config_prints_masked_settings(tmp_path: Path) -> None:
    write(tmp_path, {"environment_key_pairs": [{"server_side_key": "ser.verysecret", "client_side_key": "public1"}]})
    result = run_cli(tmp_path, "check-config")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert "verysecret" not in result.stdout
    assert printed["settings"]["environment_key_pairs"][0]["server_side_key"] == "ser.ve…et"
    assert printed["granian"]["workers"] == available_cpus()


def test_render_config_and_version(tmp_path: Path) -> None:
    rendered = run_cli(tmp_path, "render-config")
    assert rendered.returncode == 0
    assert json.loads(rendered.stdout)["api_poll_frequency_seconds"] == 10
    version = run_cli(tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.startswith("edge-proxy ")


def test_bad_granian_file_names_the_key(tmp_path: Path) -> None:
    write(tmp_path, {"environment_key_pairs": [PAIR]})
    (tmp_path / "granian.toml").write_text("workerz = 2\n")
    result = run_cli(tmp_path, "check-config")
    assert result.returncode == 2
    assert "unknown key 'workerz'" in result.stderr


# -- granian options ---------------------------------------------------------------------------------


def test_granian_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "granian.toml"
    toml.write_text('workers = 3\nport = 9000\nhost = "127.0.0.1"\nbacklog = 2048\n')
    options = load_granian_options(
        toml,
        {"GRANIAN_BACKLOG": "4096", "WEB_CONCURRENCY": "5", "GRANIAN_PORT": "9100"},
        {"port": 9200, "host": None, "workers": None},
        {"host": "10.0.0.1", "port": 9300},
    )
    assert options["port"] == 9200  # CLI beats env beats config.json beats the file
    assert options["backlog"] == 4096  # env beats the file
    assert options["workers"] == 5  # WEB_CONCURRENCY, as the Python proxy honours it
    assert options["host"] == "10.0.0.1"  # config.json server.host beats the file


def test_granian_defaults_are_production_ready() -> None:
    options = load_granian_options(None, {}, {}, {})
    assert options["respawn_failed_workers"] is True
    assert options["workers_kill_timeout"] < 30  # below Kubernetes' grace period
    assert options["workers"] == available_cpus() >= 1


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"GRANIAN_WORKERS": "many"}, "GRANIAN_WORKERS: workers: expected an integer"),
        ({"GRANIAN_HTTP": "3"}, "GRANIAN_HTTP: http: must be one of auto, 1, 2"),
        ({"GRANIAN_SSL_CERTIFICATE": "/x.pem"}, "ssl_certificate and ssl_keyfile must be given together"),
    ],
)
def test_granian_bad_values(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_granian_options(None, environ, {}, {})


def test_shipped_granian_file_is_valid_and_commented() -> None:
    shipped = ROOT / "granian.toml"
    options = load_granian_options(shipped, {}, {}, {})
    assert options["respawn_failed_workers"] is True
    for line in shipped.read_text().splitlines():
        if line.strip() and not line.startswith("#") and "=" in line:
            assert "#" in line, f"uncommented key: {line}"


def test_worker_count_follows_the_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("50000 100000\n")  # docker run --cpus=0.5
    assert available_cpus(v2) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert available_cpus(v2) == affinity
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(v1) == affinity


def test_a_worker_accepts_its_stream_bound_plus_the_backlog(tmp_path: Path) -> None:
    from proxy.supervisor.server import connection_bound

    streams = {"environment_key_pairs": [PAIR], "realtime": {"max_streams_per_worker": 5000}}
    settings = load_settings(write(tmp_path, streams))
    options = load_granian_options(None, {"GRANIAN_BACKLOG": "256", "GRANIAN_WORKERS": "2"}, {}, {})
    assert connection_bound(options, settings) == 5256  # not Granian's backlog / workers = 128
    no_streams = load_settings(write(tmp_path, {**streams, "realtime": {"enabled": False}}))
    assert connection_bound(options, no_streams) == 256
    explicit = load_granian_options(None, {"GRANIAN_BACKPRESSURE": "64"}, {}, {})
    assert connection_bound(explicit, settings) == 64
