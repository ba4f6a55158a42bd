"""A bad upstream never loses the last good document, never kills the poll loop, and shows in health,
logs and metrics. Real proxy processes against the fake Flagsmith API."""

from __future__ import annotations

import re
from collections.abc import Callable
from email.utils import parsedate_to_datetime

import pytest

from tests.fake_upstream import FakeFlagsmith
from tests.support import ProxyProcess, free_port, proxy_config, wait_for

CLIENT = {"X-Environment-Key": "env_client_key_1"}
FAST = {"api_poll_frequency_seconds": 0.3, "health_check": {"environment_update_grace_period_seconds": 0.5}}


def banner_enabled(proxy: ProxyProcess) -> bool:
    return proxy.get("/api/v1/flags/?feature=show_banner", headers=CLIENT).json()["enabled"]


def metric(proxy: ProxyProcess, name: str, labels: str = "") -> float:
    text = proxy.get("/metrics").text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("mode", ["fail", "list", "notjson", "invalid", "delay"])
def test_bad_answers_keep_the_last_good_document(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess], mode: str
) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url, api_poll_timeout_seconds=0.5, **FAST))
    proxy.wait_ready()
    before = proxy.get("/api/v1/flags/", headers=CLIENT).json()
    if mode == "fail":
        upstream.fail = 500
    elif mode == "delay":
        upstream.delay = 1.5  # longer than the 0.5 s timeout
    else:
        upstream.garbage = mode

    # stale after poll + grace × pairs = 0.3 + 0.5 × 2 = 1.3 s, each environment on its own clock. With a
    # slow upstream an environment can turn stale while its failing fetch is still in flight (0.5 s timeout,
    # then up to 0.5 s until the status-only publication): its error kind shows a moment later.
    def both_stale() -> bool:
        stale = proxy.get("/proxy/health").json().get("environments", {}).get("stale", [])
        return len(stale) == 2 and all(e["error"] for e in stale)

    assert wait_for(both_stale, 15), proxy.log()
    health = proxy.get("/proxy/health").json()
    assert health["status"] == "error"
    assert health["reason"] == "environment document(s) stale."
    assert health["last_successful_update"].endswith("Z")
    assert {e["key"] for e in health["environments"]["stale"]} == {"en…_1", "en…_2"}
    assert all(e["error"] for e in health["environments"]["stale"])  # the kind; the text only with details
    assert not any("last_error" in e for e in health["environments"]["stale"])
    assert proxy.get("/proxy/health/liveness").status_code == 200
    # still served from the last good copy
    assert proxy.get("/api/v1/flags/", headers=CLIENT).json() == before
    assert wait_for(lambda: metric(proxy, "edge_proxy_upstream_fetches_total", '{outcome="error"}') >= 2, 10)
    reason = {"fail": "http_5xx", "list": "invalid_document", "notjson": "invalid_json", "invalid": "invalid_document"}
    errors = metric(proxy, "edge_proxy_upstream_fetch_errors_total", f'{{reason="{reason.get(mode, "timeout")}"}}')
    assert errors >= 2, proxy.get("/metrics").text
    assert "keeping the last good document" in proxy.log()

    # the poll loop is alive: recovery, and a change upstream is picked up
    upstream.fail = upstream.garbage = None
    upstream.delay = 0
    expected = upstream.toggle("ser.env_server_key_1", "show_banner")
    assert wait_for(lambda: proxy.get("/proxy/health").status_code == 200, 15), proxy.log()
    assert wait_for(lambda: banner_enabled(proxy) is expected, 10)


def test_upstream_down_at_start(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(proxy_config(f"http://127.0.0.1:{free_port()}/api/v1", **FAST))
    proxy.wait_live()
    health = proxy.get("/proxy/health/readiness")
    assert health.status_code == 503
    assert health.json()["reason"] == "environment document(s) not updated."
    assert health.json()["last_successful_update"] is None
    assert len(health.json()["environments"]["not_loaded"]) == 2
    known = proxy.get("/api/v1/flags/", headers=CLIENT)
    assert known.status_code == 503
    assert known.json()["status"] == "service_unavailable"
    unknown = proxy.get("/api/v1/flags/", headers={"X-Environment-Key": "nope"})
    assert unknown.status_code == 401


def test_304_without_a_cached_document_is_survived(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    upstream.garbage = "304"
    proxy = start_proxy(proxy_config(upstream.api_url, **FAST))
    proxy.wait_live()
    assert wait_for(lambda: upstream.count() >= 4, 10)
    assert proxy.get("/proxy/health").status_code == 503
    upstream.garbage = None
    proxy.wait_ready(15)
    assert proxy.get("/api/v1/flags/", headers=CLIENT).status_code == 200


def test_conditional_requests_use_gmt_dates(upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(proxy_config(upstream.api_url, api_poll_frequency_seconds=0.2))
    proxy.wait_ready()
    assert wait_for(lambda: sum(1 for r in upstream.requests if r["ims"]) >= 2, 10)
    first, *later = [r for r in upstream.requests if r["key"] == "ser.env_server_key_1"]
    assert first["ims"] is None
    ims = next(r["ims"] for r in later if r["ims"])
    # IMF-fixdate, zero-padded day, literal GMT: what Django's parser accepts
    assert re.fullmatch(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT", ims), ims
    assert parsedate_to_datetime(ims).isoformat() == "2024-05-01T12:00:00+00:00"
    assert first["ua"].startswith("flagsmith-edge-proxy-python/")


def test_paginated_documents_keep_every_identity_override(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    upstream.page_size = 1  # env1 has 3 identity overrides: 3 pages
    proxy = start_proxy(proxy_config(upstream.api_url))
    proxy.wait_ready()
    pages = [r for r in upstream.requests if r["key"] == "ser.env_server_key_1" and "page_id" in r["query"]]
    assert {r["query"] for r in pages} == {"page_id=1", "page_id=2"}
    assert all(r["ims"] is None for r in pages)
    # the last page's override (tester@example.com) is applied
    response = proxy.get("/api/v1/identities/?identifier=tester%40example.com", headers=CLIENT)
    plain = proxy.get("/api/v1/identities/?identifier=someone-else", headers=CLIENT)
    assert response.json()["flags"] != plain.json()["flags"]


def test_next_page_on_another_origin_is_refused(
    upstream: FakeFlagsmith, start_proxy: Callable[..., ProxyProcess]
) -> None:
    upstream.next_link = "http://127.0.0.2:1/steal"
    proxy = start_proxy(proxy_config(upstream.api_url, **FAST))
    proxy.wait_live()
    assert wait_for(lambda: "another origin" in proxy.log(), 10), proxy.log()
    assert proxy.get("/proxy/health").status_code == 503
    assert proxy.get("/api/v1/flags/", headers=CLIENT).status_code == 503
