"""Edge controls (issue 21): client addresses behind trusted proxies, network allow lists per route group.

In-process units for the parsing (CIDRs, `X-Forwarded-For`, `Forwarded`); real `edge-proxy serve`
processes for the answers, with real clients bound to different loopback source addresses (127.0.0.x):
Linux routes all of 127/8 to the loopback interface, so each address is a distinct client to the proxy.
"""

from __future__ import annotations

import http.client
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.area import buckets
from proxy.config.settings import ConfigError, load_settings
from proxy.http.client_address import ClientAddresses, Networks, forwarded_for, parse_address
from tests.fake_upstream import FakeFlagsmith
from tests.support import EDGE_PROXY, KEYS, ProxyProcess, proxy_config, wait_for

CLIENT_KEY = "env_client_key_1"
SERVER_KEY = "ser.env_server_key_1"


def client_from(source: str) -> httpx.Client:
    """A real HTTP client whose connections come from `source` (a 127.0.0.x address)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10)


# -- units: addresses, networks, forwarding headers ---------------------------------------------------


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("10.1.2.3", "10.1.2.3"),
        (" 10.1.2.3 ", "10.1.2.3"),
        ("10.1.2.3:4711", "10.1.2.3"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ('"[2001:db8::17]"', "2001:db8::17"),
        ("unknown", None),
        ("_hidden", None),
        ("10.1.2.300", None),
        ("[::1", None),
        ("", None),
    ],
)
def test_addresses_are_read_in_every_way_proxies_write_them(written: str, canonical: str | None) -> None:
    parsed = parse_address(written)
    assert (str(parsed) if parsed is not None else None) == canonical


def test_networks_match_by_family_and_cache_their_answers() -> None:
    networks = Networks(["10.0.0.0/8", "2001:db8::/32"])
    assert "10.200.0.1" in networks and "2001:db8:1::5" in networks
    assert "11.0.0.1" not in networks and "2001:db9::1" not in networks and "garbage" not in networks
    assert "::ffff:10.0.0.1" in networks  # an IPv4-mapped peer is its IPv4 address
    assert "10.200.0.1" in networks  # from the cache this time
    assert "10.200.0.1" in networks._cache


def test_the_cache_stays_bounded_whatever_the_number_of_addresses() -> None:
    from proxy.http.client_address import CACHE_MAX

    networks = Networks(["10.0.0.0/8"])
    for n in range(CACHE_MAX + 10):
        assert f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" in networks
    assert len(networks._cache) <= CACHE_MAX


def test_forwarded_header_for_values() -> None:
    value = b'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711", proto=https, for=unknown'
    assert forwarded_for(value) == ["192.0.2.60", "[2001:db8:cafe::17]:4711", "unknown", "unknown"]


TRUSTED = ["10.0.0.0/8", "fd00::/8"]


def resolve(peer: str, header: str, *values: str, trusted: list[str] = TRUSTED) -> str:
    addresses = ClientAddresses(trusted, header)
    return addresses.resolve((peer, 5555), [(header.encode(), value.encode()) for value in values])


def test_an_untrusted_peer_is_the_client_whatever_it_forwards() -> None:
    assert resolve("198.51.100.7", "x-forwarded-for", "203.0.113.1") == "198.51.100.7"
    assert resolve("198.51.100.7", "x-forwarded-for", "203.0.113.1", trusted=[]) == "198.51.100.7"


def test_behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() -> None:
    # the client wrote the first two hops; our load balancer appended what it saw, then a second trusted hop
    assert resolve("10.0.0.2", "x-forwarded-for", "1.1.1.1, 2.2.2.2, 203.0.113.9, 10.0.0.1") == "203.0.113.9"
    # repeated header lines count in order
    assert resolve("10.0.0.2", "x-forwarded-for", "1.1.1.1", "203.0.113.9, 10.0.0.1") == "203.0.113.9"
    assert resolve("10.0.0.2", "x-forwarded-for", "203.0.113.9:5000") == "203.0.113.9"
    assert resolve("10.0.0.2", "forwarded", 'for=1.1.1.1, for="[2001:db8::9]:80";proto=https') == "2001:db8::9"
    assert resolve("::ffff:10.0.0.2", "x-forwarded-for", "203.0.113.9") == "203.0.113.9"


def test_a_client_cannot_choose_its_address_through_the_other_header_or_garbage() -> None:
    # the proxy appends to X-Forwarded-For: a client's own Forwarded header is never read
    addresses = ClientAddresses(TRUSTED, "x-forwarded-for")
    headers = [(b"forwarded", b"for=1.1.1.1"), (b"x-forwarded-for", b"203.0.113.9")]
    assert addresses.resolve(("10.0.0.2", 1), headers) == "203.0.113.9"
    # a hop that is no address ends the walk at the last trusted hop, never at the garbage or left of it
    assert resolve("10.0.0.2", "x-forwarded-for", "1.1.1.1, nonsense, 10.0.0.1") == "10.0.0.1"
    assert resolve("10.0.0.2", "forwarded", "for=1.1.1.1, for=_hidden") == "10.0.0.2"
    # no header at all, or only trusted hops: the leftmost trusted address
    assert resolve("10.0.0.2", "x-forwarded-for") == "10.0.0.2"
    assert resolve("10.0.0.2", "x-forwarded-for", "10.9.9.9, 10.0.0.1") == "10.9.9.9"


def test_no_peer_is_unknown() -> None:
    assert ClientAddresses([], "x-forwarded-for").resolve(None, []) == "unknown"


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        ({"access": {"public": ["10.0.0.0/8", "10.0.0.300/8"]}}, "config error: access.public.1: not an IP network"),
        ({"access": {"operations": "10.0.0.0/8"}}, "config error: access.operations: Input should be a valid list"),
        ({"trusted_proxies": ["proxy.internal"]}, "config error: trusted_proxies.0: not an IP network"),
        ({"forwarded_header": "x-real-ip"}, "config error: forwarded_header: Input should be"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_key(overrides: dict[str, Any], line: str, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(__import__("json").dumps(proxy_config("http://127.0.0.1:9", **overrides)))
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert str(raised.value).startswith(line) and "\n" not in str(raised.value)


def test_a_bad_cidr_stops_serve_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        __import__("json").dumps(proxy_config("http://127.0.0.1:9", access={"public": ["10.0.0.0/33"]}))
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


def test_settings_normalize_networks() -> None:
    from proxy.config.settings import Settings

    pairs = [{"server_side_key": server, "client_side_key": client} for server, client in KEYS.items()]
    settings = Settings(environment_key_pairs=pairs, access={"public": ["10.1.2.3", "10.1.2.3/8"]})
    assert settings.access.public == ["10.1.2.3/32", "10.0.0.0/8"]


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


# -- units: the shared bucket table -------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_refills_at_its_rate(tmp_path: Path) -> None:
    buckets.create(tmp_path / "t", 64)
    table = buckets.BucketTable(tmp_path / "t")
    try:
        assert [table.take(b"a", 10.0, 3.0) for _ in range(3)] == [0.0, 0.0, 0.0]
        wait = table.take(b"a", 10.0, 3.0)
        assert 0.05 < wait <= 0.1  # one token every 0.1 s
        assert table.take(b"b", 10.0, 3.0) == 0.0  # another name, its own bucket
        time.sleep(0.12)
        assert table.take(b"a", 10.0, 3.0) == 0.0
    finally:
        table.close()


def test_names_are_fingerprinted_not_stored(tmp_path: Path) -> None:
    buckets.create(tmp_path / "t", 64)
    table = buckets.BucketTable(tmp_path / "t")
    table.take(b"kser.a_secret_server_key", 1.0, 1.0)
    table.close()
    assert b"secret" not in (tmp_path / "t").read_bytes()


def test_memory_is_bounded_and_the_most_idle_bucket_is_reused(tmp_path: Path) -> None:
    buckets.create(tmp_path / "t", 4)  # one set of four slots
    table = buckets.BucketTable(tmp_path / "t")
    size = (tmp_path / "t").stat().st_size
    try:
        for name in (b"w", b"x", b"y"):
            assert table.take(name, 0.001, 2.0) == 0.0
        assert table.take(b"busy", 0.001, 2.0) == 0.0
        assert table.take(b"busy", 0.001, 2.0) == 0.0
        assert table.take(b"busy", 0.001, 2.0) > 0  # empty: 1,000 s to the next token
        for n in range(1000):  # many other clients come and go in the same set
            table.take(b"other-%d" % n, 0.001, 2.0)
        # the busy client's bucket was the emptiest: never the one reused, so it stays limited
        assert table.take(b"busy", 0.001, 2.0) > 0
        assert (tmp_path / "t").stat().st_size == size
    finally:
        table.close()


def _hammer(path: str, attempts: int, taken: Any, start: Any) -> None:
    table = buckets.BucketTable(Path(path))
    start.wait()
    count = sum(1 for _ in range(attempts) if table.take(b"shared", 1e-9, 20_000.0) == 0.0)
    with taken.get_lock():
        taken.value += count
    table.close()


def test_processes_sharing_a_table_never_take_more_than_the_burst(tmp_path: Path) -> None:
    """Four processes race for one bucket of 20,000 tokens (no refill): exactly 20,000 are taken. Without
    the per-set lock, read-modify-write races hand out more (seen: 36,148)."""
    import multiprocessing

    buckets.create(tmp_path / "t", 64)
    context = multiprocessing.get_context("fork")
    taken = context.Value("i", 0)
    start = context.Barrier(4)
    workers = [context.Process(target=_hammer, args=(str(tmp_path / "t"), 10_000, taken, start)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert taken.value == 20_000


def test_without_an_area_the_controls_count_in_a_private_table() -> None:
    from proxy.http.edge_controls import EdgeControls, Group
    from tests.inprocess import settings_for

    controls = EdgeControls(settings_for(rate_limits={"per_client_address": {"requests_per_second": 1, "burst": 2}}))
    assert controls.active
    peer = ("192.0.2.1", 1)
    assert controls.check(Group.FLAGS, peer, [], b"k") is None
    assert controls.check(Group.FLAGS, peer, [], b"k") is None
    refusal = controls.check(Group.FLAGS, peer, [], b"k")
    assert refusal is not None and refusal.status == 429 and refusal.headers == [(b"retry-after", b"1")]
    assert controls.check(Group.SDK, peer, [], b"k") is None  # streams and analytics are not limited
    assert controls.check(Group.FLAGS, ("192.0.2.2", 1), [], b"k") is None


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


def test_every_edge_setting_is_in_render_config_the_readme_and_the_chart() -> None:
    from proxy.config.settings import default_config

    root = Path(__file__).parents[1]
    rendered = default_config()
    readme = (root / "README.md").read_text()
    values = (root / "deploy" / "helm" / "edge-proxy" / "values.yaml").read_text()
    settings = {
        "trusted_proxies": [],
        "forwarded_header": "x-forwarded-for",
        "access": ["public", "server_keys", "operations"],
        "rate_limits": ["per_client_address", "per_key", "table_entries"],
        "redis_url": None,
    }
    for key, nested in settings.items():
        assert key in rendered, key
        names = [f"{key}.{name}" for name in nested] if isinstance(nested, list) and key != "trusted_proxies" else [key]
        for name in names:
            if "." in name:
                assert name.split(".")[1] in rendered[key], name
            assert f"| `{name}` |" in readme, name
        assert f"\n  {key}:" in values, key
