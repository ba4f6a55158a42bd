"""/metrics of a real proxy (2 workers and a leader): promtool-clean, Flagsmith API's shapes, exact sums.

`promtool` comes from Debian's `prometheus` package (`make test` installs it when missing).
"""

from __future__ import annotations

import fcntl
import http.client
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from proxy.area.processes import ARCHIVE_LOCK, DEAD, archive, reap
from proxy.metrics import prometheus as metrics
from tests.fake_upstream import FakeFlagsmith
from tests.support import ROOT, ProxyProcess, conformance_documents, proxy_config, wait_for

CLIENT = {"X-Environment-Key": "env_client_key_1"}
SERVER = {"X-Environment-Key": "ser.env_server_key_2"}
KEY_FRAGMENTS = ("env_client_key", "env_server_key", "en…_", "ser.en", "revoked", "re…ey")
CHART_FILES = ROOT / "deploy" / "helm" / "edge-proxy" / "files"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: `apt-get install prometheus` (make test does it)"
    return found


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name → [(labels, value)], as Prometheus would parse the exposition."""
    found: defaultdict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name].append((sample.labels, sample.value))
    return found


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for found, v in samples(text).get(name, []) if all(found.get(k) == x for k, x in labels.items()))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Everything on: usage reporting (proxy_key), analytics, and a third environment whose key upstream
    refuses (so failure series exist too); readiness tolerates it (`all_stale`)."""
    upstream = FakeFlagsmith(conformance_documents()).start()
    config = proxy_config(
        upstream.api_url,
        proxy_key=upstream.proxy_key,
        usage_flush_interval_seconds=1,
        analytics_flush_interval_seconds=1,
        health_check={"fail_readiness_when": "all_stale", "show_details": True},  # x-edge-proxy-worker
    )
    config["environment_key_pairs"].append({"server_side_key": "ser.revoked_key", "client_side_key": "revoked_key"})
    proxy = ProxyProcess(tmp_path_factory.mktemp("metrics"), config, workers=2).start()
    try:
        proxy.wait_ready()
        assert wait_for(lambda: len(proxy.worker_pids()) == 2, 20), proxy.log()
        yield proxy
    finally:
        proxy.stop()
        upstream.stop()


def send(proxy: ProxyProcess, connections: int, per_connection: int) -> Counter[int]:
    """`per_connection` flags requests on each of `connections` fresh connections; requests per worker pid."""
    per_worker: Counter[int] = Counter()
    for _ in range(connections):
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            connection.request("GET", "/proxy/health/liveness")
            connection.getresponse().read()
            connection.request("GET", "/proxy/health")
            response = connection.getresponse()
            response.read()
            worker = int(response.getheader("x-edge-proxy-worker"))
            for _ in range(per_connection):
                connection.request("GET", "/api/v1/flags/", headers=CLIENT)
                response = connection.getresponse()
                response.read()
                assert response.status == 200
            per_worker[worker] += per_connection
        finally:
            connection.close()
    return per_worker


FLAGS_200 = {"route": "/api/v1/flags/", "method": "GET", "response_status": "200"}


def test_requests_sum_over_workers_and_pass_promtool(two_workers: ProxyProcess, tmp_path: Path) -> None:
    proxy = two_workers
    before = value(proxy.get("/metrics").text, "flagsmith_http_server_requests_total", **FLAGS_200)
    per_worker: Counter[int] = Counter()
    for _ in range(20):  # fresh connections until both workers have served some
        per_worker += send(proxy, 4, 25)
        if len(per_worker) == 2:
            break
    assert set(per_worker) == set(proxy.worker_pids()), per_worker
    sent = sum(per_worker.values())
    # other routes and statuses, each in its own series
    assert proxy.get("/api/v1/flags/", headers={"X-Environment-Key": "nope"}).status_code == 401
    assert proxy.get("/no/such/route").status_code == 404
    assert proxy.get("/api/v1/environment-document/", headers=SERVER).status_code == 200

    def flushed() -> bool:  # each worker flushes within a second; /metrics flushes the one answering
        total = value(proxy.get("/metrics").text, "flagsmith_http_server_requests_total", **FLAGS_200)
        return total - before == sent

    assert wait_for(flushed, 10, 0.2), (sent, per_worker)
    text = proxy.get("/metrics").text
    (tmp_path / "metrics.txt").write_text(text)
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    found = samples(text)
    # the histogram agrees with the counter for every label set, and its buckets are cumulative
    for labels, count in found["flagsmith_http_server_requests_total"]:
        assert set(labels) == {"route", "method", "response_status"}
        buckets = sorted(
            (float(b["le"]), v)
            for b, v in found["flagsmith_http_server_request_duration_seconds_bucket"]
            if {k: b[k] for k in labels} == labels
        )
        assert [le for le, _ in buckets] == [*metrics.LATENCY_BUCKETS, math.inf]
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
        assert buckets[-1][1] == count
        assert value(text, "flagsmith_http_server_request_duration_seconds_count", **labels) == count
        assert value(text, "flagsmith_http_server_request_duration_seconds_sum", **labels) > 0
    assert value(text, "flagsmith_http_server_requests_total", route="unmatched", response_status="404") >= 1
    assert value(text, "flagsmith_http_server_requests_total", route="/api/v1/flags/", response_status="401") >= 1
    assert value(text, "flagsmith_http_server_requests_total", route="/api/v1/environment-document/") >= 1
    # a request served in well under a second lands below the last finite bucket
    assert value(text, "flagsmith_http_server_request_duration_seconds_bucket", le="1.0", **FLAGS_200) >= sent

    [(build, one)] = found["flagsmith_build_info"]  # one series, however many processes set it
    assert one == 1 and build["version"] and build["ci_commit_sha"]
    # per-environment series by the document's id and name; no key, masked or not, anywhere
    assert not [fragment for fragment in KEY_FRAGMENTS if fragment in text]
    named = {
        (labels["environment_id"], labels["environment_name"])
        for labels, _ in found["edge_proxy_environment_document_bytes"]
    }
    assert named == {("1", "Development"), ("2", "Staging")}
    assert value(text, "edge_proxy_environments", state="fresh") == 2
    assert value(text, "edge_proxy_environments", state="not_loaded") == 1
    assert value(text, "edge_proxy_environment_stale") == 0
    workers = {labels["worker"] for labels, _ in found["edge_proxy_worker_generation"]}
    assert workers == {str(pid) for pid in proxy.worker_pids()}

    def caught_up() -> bool:  # workers report their generation when they flush, every second
        now = samples(proxy.get("/metrics").text)
        [(_, published)] = now["edge_proxy_published_generation"]
        return published >= 1 and all(v == published for _, v in now["edge_proxy_worker_generation"])

    assert wait_for(caught_up, 10, 0.2), proxy.get("/metrics").text
    assert value(text, "edge_proxy_upstream_fetch_seconds_count") >= 2


def test_a_dead_workers_series_go_and_its_counts_stay(two_workers: ProxyProcess) -> None:
    proxy = two_workers
    send(proxy, 8, 5)
    assert wait_for(lambda: "edge_proxy_worker_generation" in proxy.get("/metrics").text, 5)

    def settled_total() -> float:  # wait for both workers' background flush
        first = value(proxy.get("/metrics").text, "flagsmith_http_server_requests_total")
        time.sleep(1.5)
        return max(first, value(proxy.get("/metrics").text, "flagsmith_http_server_requests_total"))

    counted = settled_total()
    restarts = value(proxy.get("/metrics").text, "edge_proxy_worker_restarts_total")
    victim = proxy.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        pids = proxy.worker_pids()
        return len(pids) == 2 and victim not in pids

    assert wait_for(replaced, 30, 0.2), proxy.log()

    def tidied() -> bool:
        text = proxy.get("/metrics").text
        workers = {labels["worker"] for labels, _ in samples(text)["edge_proxy_worker_generation"]}
        return workers == {str(pid) for pid in proxy.worker_pids()}

    assert wait_for(tidied, 15, 0.2), proxy.get("/metrics").text
    text = proxy.get("/metrics").text
    assert f'worker="{victim}"' not in text
    assert value(text, "edge_proxy_worker_restarts_total") == restarts + 1
    # what the dead worker had flushed is still counted (counters never go down)
    assert value(text, "flagsmith_http_server_requests_total") >= counted
    # ... from the archive: its own files are gone, so the area does not grow with every respawn
    folder = proxy.area / "metrics"
    assert wait_for(lambda: not list(folder.glob(f"*_{victim}.db")), 5), sorted(p.name for p in folder.iterdir())
    assert (folder / "counter_archive.db").exists() and (folder / "histogram_archive.db").exists()


def _collected(folder: Path) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    collector = multiprocess.MultiProcessCollector(None, path=str(folder))
    return sorted(
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for metric in collector.collect()
        for sample in metric.samples
    )


def test_archiving_a_dead_process_keeps_every_total(tmp_path: Path) -> None:
    for pid, count in ((101, 3.0), (102, 4.0), (103, 5.0)):
        counter = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        counter.write_value(mmap_key("c", "c_total", ["route"], ["/x"], "a counter"), count, 0.0)
        counter.write_value(mmap_key("c", "c_total", ["route"], [f"/only-{pid}"], "a counter"), 1.0, 0.0)
        counter.close()
        histogram = MmapedDict(str(tmp_path / f"histogram_{pid}.db"))
        for le, share in (("0.1", count), ("+Inf", 1.0)):
            histogram.write_value(mmap_key("h", "h_bucket", ["le"], [le], "a histogram"), share, 0.0)
        histogram.write_value(mmap_key("h", "h_sum", [], [], "a histogram"), count / 10, 0.0)
        histogram.close()
    before = _collected(tmp_path)
    assert archive(tmp_path, [101])
    assert _collected(tmp_path) == before
    assert archive(tmp_path, [102])
    assert _collected(tmp_path) == before
    names = sorted(p.name for p in tmp_path.glob("*.db"))
    assert names == ["counter_103.db", "counter_archive.db", "histogram_103.db", "histogram_archive.db"]
    assert ("c_total", (("route", "/x"),), 12.0) in before  # summed over all three processes


def test_the_leader_never_waits_for_the_archive_lock(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    area, folder = tmp_path, tmp_path / "metrics"
    folder.mkdir()
    (area / "processes").mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a worker that died: its pid is free
    (area / "processes" / str(gone.pid)).write_text("worker 1")
    counter = MmapedDict(str(folder / f"counter_{gone.pid}.db"))
    counter.write_value(mmap_key("c", "c_total", [], [], "a counter"), 7.0, 0.0)
    counter.close()
    before = _collected(folder)
    # A scrape in progress, as an endless flood of overlapping scrapes looks to an exclusive flock
    scrape = os.open(folder / ARCHIVE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(scrape, fcntl.LOCK_SH)
    try:
        found: list[list[str]] = []
        leader = threading.Thread(target=lambda: found.append(reap(area, folder)), daemon=True)
        leader.start()
        leader.join(2)
        assert not leader.is_alive(), "the leader's reap waited for the archive lock"
        assert found == [["worker"]]  # counted the round it is found dead
        assert (folder / f"counter_{gone.pid}.db").exists() and not (folder / "counter_archive.db").exists()
        assert _collected(folder) == before
        # starved for two minutes: said (once a period), and still not counted again
        marker = area / "processes" / f"{gone.pid}{DEAD}"
        long_ago = time.time() - 120
        os.utime(marker, (long_ago, long_ago))
        with caplog.at_level(logging.WARNING, "proxy.leader"):
            assert reap(area, folder) == []
            assert reap(area, folder) == []
        starved = [r.getMessage() for r in caplog.records if "waited" in r.getMessage()]
        assert len(starved) == 1 and "1 dead process(es) have waited 120s for the archive lock" in starved[0]
    finally:
        os.close(scrape)
    assert reap(area, folder) == []  # the lock is free: archived now, not counted again
    assert not (folder / f"counter_{gone.pid}.db").exists() and (folder / "counter_archive.db").exists()
    assert not list((area / "processes").iterdir())
    assert _collected(folder) == before


def test_observe_buckets_are_inclusive_and_flush_moves_deltas() -> None:
    route = "/test/observe"
    for seconds in (0.0001, 0.00010001, 0.3, 99.0):
        metrics.observe(route, "GET", 200, seconds)
    metrics.observe(route, "BREW", 418, 0.001)  # any other method is "other"
    metrics.flush()
    metrics.flush()  # a second flush adds nothing
    text = metrics.render().decode()
    labels = {"route": route, "method": "GET", "response_status": "200"}
    assert value(text, "flagsmith_http_server_requests_total", **labels) == 4
    assert value(text, "flagsmith_http_server_request_duration_seconds_bucket", le="0.0001", **labels) == 1
    assert value(text, "flagsmith_http_server_request_duration_seconds_bucket", le="0.00025", **labels) == 2
    assert value(text, "flagsmith_http_server_request_duration_seconds_bucket", le="0.5", **labels) == 3
    assert value(text, "flagsmith_http_server_request_duration_seconds_bucket", le="10.0", **labels) == 3
    assert value(text, "flagsmith_http_server_request_duration_seconds_bucket", le="+Inf", **labels) == 4
    assert value(text, "flagsmith_http_server_request_duration_seconds_sum", **labels) == pytest.approx(99.30020001)
    assert value(text, "flagsmith_http_server_requests_total", route=route, method="other") == 1
    metrics.observe(route, "GET", 200, 0.002)
    metrics.flush()
    text = metrics.render().decode()
    assert value(text, "flagsmith_http_server_requests_total", **labels) == 5


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    for command in (["check", "rules", str(CHART_FILES / "alerts.yaml")], ["test", "rules", "alerts_test.yaml"]):
        run = subprocess.run([promtool(), *command], cwd=ROOT / "tests" / "data", capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
PROMQL_WORDS |= {"offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, matchers, ranges and grouping removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    words = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)
    return {word for word in words if word.lower() not in PROMQL_WORDS}


def grafana_exprs() -> list[str]:
    dashboard = json.loads((CHART_FILES / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) > 20
    # Grafana's variables, as Grafana would substitute them
    return [e.replace("$__rate_interval", "5m").replace('"$job"', '".*"').replace('"$instance"', '".*"') for e in exprs]


def test_dashboard_and_alerts_name_only_exported_metrics(two_workers: ProxyProcess, tmp_path: Path) -> None:
    proxy = two_workers
    # traffic that makes every labelled series exist: identities (cache), analytics and usage (flushed
    # upstream every second)
    body = {"identifier": "user-1", "traits": [{"trait_key": "plan", "trait_value": "premium"}]}
    for _ in range(2):
        assert httpx.post(proxy.url + "/api/v1/identities/", json=body, headers=CLIENT).status_code == 200
    analytics = httpx.post(proxy.url + "/api/v1/analytics/flags/", json={"show_banner": 3}, headers=CLIENT)
    assert analytics.status_code == 200
    wanted = (
        "edge_proxy_analytics_events_total",
        "edge_proxy_usage_rows_total",
        "edge_proxy_upstream_fetch_errors_total",
    )
    assert wait_for(lambda: all(name in proxy.get("/metrics").text for name in wanted), 15), proxy.get("/metrics").text
    exported = set(samples(proxy.get("/metrics").text))

    exprs = grafana_exprs()
    alerts = yaml.safe_load((CHART_FILES / "alerts.yaml").read_text())
    alert_exprs = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    named = {name for expr in [*exprs, *alert_exprs] for name in metric_names(expr)}
    assert "flagsmith_http_server_request_duration_seconds_bucket" in named and "edge_proxy_usage_rows_total" in named
    assert named - exported == set(), sorted(exported)
    # and every dashboard query is valid PromQL: promtool parses them as recording rules
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(rules))
    check = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "dashboard.yaml")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_metric_names_finds_selectors_only() -> None:
    expr = 'histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{job=~"x|y", b="c{d}"}[5m]))) / on (job) b_total'
    assert metric_names(expr) == {"a_bucket", "b_total"}
