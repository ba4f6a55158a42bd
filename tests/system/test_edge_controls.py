"""Edge controls (issue 21) against real `edge-proxy serve` processes: network allow lists per route
group, the client address behind a trusted proxy, per-client rate limits across workers, a bad CIDR at
start-up. Real clients bound to different loopback source addresses (127.0.0.x): Linux routes all of
127/8 to the loopback interface, so each address is a distinct client to the proxy. The pieces in
process: tests/unit/test_edge_controls.py.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fake_upstream import FakeFlagsmith
from tests.support import EDGE_PROXY, ProxyProcess, proxy_config, wait_for

CLIENT_KEY = "env_client_key_1"
SERVER_KEY = "ser.env_server_key_1"


def client_from(source: str) -> httpx.Client:
    """A real HTTP client whose connections come from `source` (a 127.0.0.x address)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10)


# -- start-up ----------------------------------------------------------------------------------------


def test_a_bad_cidr_stops_serve_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(proxy_config("http://127.0.0.1:9", access={"public": ["10.0.0.0/33"]}))
    )
    done = subprocess.run(
        [EDGE_PROXY, "serve", "--port", "1"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "CONFIG_PATH": str(tmp_path / "config.json")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "config error: access.public.0: not an IP network in CIDR notation (e.g. 10.0.0.0/8, 2001:db8::/32): "
        "'10.0.0.0/33'"
    ]


# -- real processes: allow lists per route group ------------------------------------------------------


@pytest.fixture
def guarded(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    config = proxy_config(
        upstream.api_url,
        access={"public": ["127.0.0.2/32"], "server_keys": ["127.0.0.4/32"], "operations": ["127.0.0.3"]},
        health_check={"show_details": True},
        allow_origins=["https://app.example"],
    )
    proxy = start_proxy(config, workers=2)
    proxy.wait_ready()
    return proxy


def test_each_route_group_answers_only_its_networks(guarded: ProxyProcess) -> None:
    url = guarded.url
    public, operations, servers, other = (client_from(f"127.0.0.{n}") for n in (2, 3, 4, 5))
    client_key = {"X-Environment-Key": CLIENT_KEY}
    server_key = {"X-Environment-Key": SERVER_KEY}
    with public, operations, servers, other:
        # public routes with a client key: only from access.public
        assert public.get(f"{url}/api/v1/flags/", headers=client_key).status_code == 200
        ofrep = public.post(f"{url}/ofrep/v1/evaluate/flags", headers=client_key, json={"context": {}})
        assert ofrep.status_code == 200
        refused = other.get(f"{url}/api/v1/flags/", headers={**client_key, "Origin": "https://app.example"})
        assert refused.status_code == 403
        assert refused.json() == {
            "status": "forbidden",
            "message": "client address 127.0.0.5 is not allowed on this route (access.public)",
        }
        # a refusal is an answer like any other: CORS headers for an allowed origin
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
        assert other.get(f"{url}/sse/environments/{CLIENT_KEY}/stream").status_code == 403
        no_key = other.post(f"{url}/api/v1/identities/", json={"identifier": "a"})
        assert no_key.status_code == 403  # refused before the key is even looked at: no key oracle
        # what a server key unlocks: only from access.server_keys, whichever route
        assert servers.get(f"{url}/api/v1/environment-document/", headers=server_key).status_code == 200
        assert servers.get(f"{url}/api/v1/flags/", headers=server_key).status_code == 200
        denied = public.get(f"{url}/api/v1/environment-document/", headers=server_key)
        assert denied.status_code == 403 and "access.server_keys" in denied.json()["message"]
        assert public.get(f"{url}/api/v1/flags/", headers=server_key).status_code == 403
        # operations
        assert operations.get(f"{url}/metrics").status_code == 200
        assert operations.get(f"{url}/proxy/status").status_code == 200
        metrics_refused = public.get(f"{url}/metrics")
        assert metrics_refused.status_code == 403 and "access.operations" in metrics_refused.json()["message"]
        assert other.get(f"{url}/proxy/status").status_code == 403
        # probes stay open to everyone; health's details only for access.operations
        for path in ("/proxy/health/liveness", "/proxy/health/readiness", "/proxy/health", "/health"):
            assert other.get(url + path).status_code == 200, path
        assert "x-edge-proxy-worker" not in other.get(f"{url}/proxy/health").headers
        detailed = operations.get(f"{url}/proxy/health")
        assert "x-edge-proxy-worker" in detailed.headers and "sources" in detailed.json()
        assert "sources" not in other.get(f"{url}/proxy/health").json()
        # refusals are counted, by list (each worker flushes its counts within a second)
        wanted = (
            'edge_proxy_access_denied_total{list="access.public"}',
            'edge_proxy_access_denied_total{list="access.server_keys"}',
            'edge_proxy_access_denied_total{list="access.operations"}',
            'flagsmith_http_server_requests_total{method="GET",response_status="403",route="/metrics"}',
        )
        scraped = [""]

        def counted() -> bool:
            scraped[0] = operations.get(f"{url}/metrics").text
            return all(line in scraped[0] for line in wanted)

        assert wait_for(counted, 10), scraped[0]


def test_behind_a_trusted_proxy_the_forwarded_client_is_checked(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    config = proxy_config(upstream.api_url, trusted_proxies=["127.0.0.6/32"], access={"public": ["203.0.113.0/24"]})
    proxy = start_proxy(config)
    proxy.wait_ready()
    key = {"X-Environment-Key": CLIENT_KEY}
    with client_from("127.0.0.6") as balancer, client_from("127.0.0.7") as direct:
        # the load balancer appended the client it saw (203.0.113.9) to what the client sent
        allowed = balancer.get(
            f"{proxy.url}/api/v1/flags/", headers={**key, "X-Forwarded-For": "10.0.0.1, 203.0.113.9"}
        )
        assert allowed.status_code == 200
        # a client that forwards an allowed address itself gets nowhere: it is the rightmost untrusted hop
        spoofed = balancer.get(
            f"{proxy.url}/api/v1/flags/", headers={**key, "X-Forwarded-For": "203.0.113.9, 198.51.100.1"}
        )
        assert spoofed.status_code == 403 and "198.51.100.1" in spoofed.json()["message"]
        # an untrusted peer's X-Forwarded-For is never read
        direct_answer = direct.get(f"{proxy.url}/api/v1/flags/", headers={**key, "X-Forwarded-For": "203.0.113.9"})
        assert direct_answer.status_code == 403 and "127.0.0.7" in direct_answer.json()["message"]


# -- real processes: rate limits ----------------------------------------------------------------------


def fresh_get(port: int, path: str, headers: dict[str, str], source: str = "127.0.0.1") -> tuple[int, Any, Any]:
    """One GET on a new connection (so the kernel may hand it to any worker): status, headers, body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        return response.status, response.headers, body
    finally:
        connection.close()


def test_a_client_address_limit_holds_across_workers(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    rate, burst = 20, 20
    config = proxy_config(
        upstream.api_url,
        rate_limits={"per_client_address": {"requests_per_second": rate, "burst": burst}},
        health_check={"show_details": True},
        allow_origins=["https://app.example"],
    )
    proxy = start_proxy(config, workers=2)
    proxy.wait_ready()
    headers = {"X-Environment-Key": CLIENT_KEY, "Origin": "https://app.example"}
    served = refused = 0
    workers: set[str] = set()
    refusal: tuple[int, Any, Any] | None = None
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        answer = fresh_get(proxy.port, "/api/v1/flags/", headers)
        if answer[0] == 200:
            served += 1
        else:
            refused += 1
            refusal = answer
        # which worker took this connection (health is not limited; its details name the worker)
        workers.add(fresh_get(proxy.port, "/proxy/health", {})[1]["x-edge-proxy-worker"])
    elapsed = time.monotonic() - started
    assert len(workers) == 2, "connections should have reached both workers"
    expected = burst + rate * elapsed
    # shared buckets: within 20 % of the limit (per-worker buckets would allow about twice as many)
    assert 0.8 * expected <= served <= 1.2 * expected, (served, refused, expected)
    assert refusal is not None
    status, answer_headers, body = refusal
    assert status == 429 and answer_headers["retry-after"] == "1"
    assert answer_headers["access-control-allow-origin"] == "https://app.example"
    assert orjson.loads(body) == {
        "status": "too_many_requests",
        "message": "more than 20 requests per second (burst 20) from client address 127.0.0.1 "
        "(rate_limits.per_client_address); retry after 1 s",
        "limit": "per_client_address",
        "retry_after": 1,
    }
    # another client address has its own bucket
    assert fresh_get(proxy.port, "/api/v1/flags/", headers, source="127.0.0.2")[0] == 200
    # counted by limit, and as 429 answers of the route
    wanted = (
        f'edge_proxy_rate_limited_total{{limit="per_client_address"}} {float(refused)}',
        'flagsmith_http_server_requests_total{method="GET",response_status="429",route="/api/v1/flags/"}',
    )
    scraped = [""]

    def counted() -> bool:
        scraped[0] = proxy.get("/metrics").text
        return all(line in scraped[0] for line in wanted)

    assert wait_for(counted, 10), scraped[0]


def test_a_key_limit_holds_whatever_the_address(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    config = proxy_config(upstream.api_url, rate_limits={"per_key": {"requests_per_second": 0.01, "burst": 4}})
    proxy = start_proxy(config, workers=2)
    proxy.wait_ready()
    key = {"X-Environment-Key": CLIENT_KEY}
    answers = [fresh_get(proxy.port, "/api/v1/flags/", key, source=f"127.0.0.{2 + n % 3}") for n in range(8)]
    assert [status for status, _, _ in answers] == [200] * 4 + [429] * 4
    refusal = orjson.loads(answers[-1][2])
    assert refusal["limit"] == "per_key" and CLIENT_KEY not in refusal["message"]
    assert int(answers[-1][1]["retry-after"]) > 90  # 100 s per token
    # OFREP and identities share the key's bucket; another key has its own
    ofrep = httpx.post(f"{proxy.url}/ofrep/v1/evaluate/flags", headers=key, json={"context": {}}, timeout=10)
    assert ofrep.status_code == 429
    other = {"X-Environment-Key": "env_client_key_2"}
    assert fresh_get(proxy.port, "/api/v1/identities/?identifier=a", other)[0] == 200
    # probes and operations are never limited
    assert all(fresh_get(proxy.port, "/proxy/health/readiness", {})[0] == 200 for _ in range(10))
