"""Edge controls (issue 21), in process: client addresses behind trusted proxies (CIDRs, `X-Forwarded-For`,
`Forwarded`), the settings and where they are documented, the shared token-bucket table (several processes
on one table), which `OTEL_*` settings turn traces on, and the replicas' change messages against a poller.

The same controls against real processes: tests/system/test_edge_controls.py, test_fanout.py, test_tracing.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.area import buckets
from proxy.config.settings import ConfigError, load_settings
from proxy.http.client_address import ClientAddresses, Networks, forwarded_for, parse_address
from tests.support import KEYS, ROOT, proxy_config

# -- addresses, networks, forwarding headers ----------------------------------------------------------


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
    config.write_text(json.dumps(proxy_config("http://127.0.0.1:9", **overrides)))
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert str(raised.value).startswith(line) and "\n" not in str(raised.value)


def test_settings_normalize_networks() -> None:
    from proxy.config.settings import Settings

    pairs = [{"server_side_key": server, "client_side_key": client} for server, client in KEYS.items()]
    settings = Settings(environment_key_pairs=pairs, access={"public": ["10.1.2.3", "10.1.2.3/8"]})
    assert settings.access.public == ["10.1.2.3/32", "10.0.0.0/8"]


# -- the shared bucket table ----------------------------------------------------------------------


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


# -- settings, documented ---------------------------------------------------------------------------


def test_every_edge_setting_is_in_render_config_the_readme_and_the_chart() -> None:
    from proxy.config.settings import default_config

    root = ROOT
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


# -- traces: which settings turn them on -------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "zipkin"}, False),
    ],
)
def test_which_otel_settings_turn_traces_on(environ: dict[str, str], on: bool) -> None:
    from proxy.metrics.tracing import enabled

    assert enabled(environ) is on


# -- replicas: settings and change messages ---------------------------------------------------------


def test_redis_settings_route_snapshots_and_changes_and_are_masked() -> None:
    from proxy.config.settings import Settings, masked_settings
    from tests.inprocess import settings_for

    both = settings_for(redis_url="redis://:hunter2@cache:6379/0")
    assert both.snapshot_redis == both.shared_redis == "redis://:hunter2@cache:6379/0"
    assert masked_settings(both)["redis_url"] == "redis://***@cache:6379/0"
    to_disk = settings_for(redis_url="redis://cache:6379/0", snapshot_dir="/tmp/snapshots")
    assert to_disk.snapshot_redis is None and to_disk.shared_redis == "redis://cache:6379/0"
    legacy = settings_for(snapshot_redis_url="redis://cache:6379/1")
    assert legacy.snapshot_redis == legacy.shared_redis == "redis://cache:6379/1"
    assert settings_for().shared_redis is None
    with pytest.raises(ValueError, match="redis_url: must be a redis://"):
        Settings(environment_key_pairs=both.environment_key_pairs, redis_url="http://cache:6379")


def test_peer_messages_are_checked_and_never_loop() -> None:
    """A Fanout against a poller with no process or Redis: what each message makes it do."""
    import asyncio

    from proxy.area.publication import key_hash
    from proxy.leader.fanout import Fanout, digest
    from proxy.leader.poller import Poller
    from tests.inprocess import settings_for

    async def scenario() -> None:
        settings = settings_for(redis_url="redis://127.0.0.1:1/0")
        poller = Poller(settings, None, None)  # type: ignore[arg-type]  # neither is touched here
        fanout = Fanout(settings, poller, "redis://127.0.0.1:1/0")
        env = poller.environments["env_client_key_1"]
        env.document, env.environment_id = b'{"id": 1}', 1
        asked: list[str] = []
        poller.refresh_now = lambda key, interval, trigger: asked.append(key) or True  # type: ignore[method-assign]

        def peer(**message: Any) -> None:
            fanout.receive(orjson.dumps({"v": 1, "from": "peer", **message}))

        same = {"environment": key_hash("env_client_key_1"), "digest": digest(env.document)}
        peer(kind="document", **same, updated_at_us=0)
        assert asked == []  # we have it
        peer(kind="document", environment=key_hash("env_client_key_1"), digest="0" * 16, updated_at_us=0)
        assert asked == ["env_client_key_1"]  # a newer one: refresh
        peer(kind="document", environment="not-ours", digest="0" * 16)
        fanout.receive(b"garbage")
        fanout.receive(orjson.dumps({"v": 1, "from": fanout.node, "kind": "webhook", "environment_ids": []}))
        assert asked == ["env_client_key_1"]  # not ours, unreadable, our own
        peer(kind="webhook", environment_ids=[1])
        assert asked == ["env_client_key_1"] * 2
        # the document we then fetch is the one the peer announced: not announced again
        env.document = b'{"id": 1, "new": true}'
        fanout.peer_digests["env_client_key_1"] = digest(env.document)
        fanout.document_changed(env)
        assert fanout.outbox.empty()
        env.document = b'{"id": 1, "newer": true}'
        fanout.document_changed(env)
        assert orjson.loads(fanout.outbox.get_nowait())["kind"] == "document"
        await fanout.client.aclose()

    asyncio.run(scenario())
