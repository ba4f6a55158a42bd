"""The test helpers themselves: a proxy whose port another process took starts again on a new one."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.fake_upstream import FakeFlagsmith
from tests.support import ProxyProcess, free_port, proxy_config


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50


def test_a_proxy_whose_port_is_taken_retries_on_a_new_port(upstream: FakeFlagsmith, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused at once
        taken = squatter.getsockname()[1]
        proxy = ProxyProcess(tmp_path / "proxy", proxy_config(upstream.api_url))
        proxy.port, proxy.url = taken, f"http://127.0.0.1:{taken}"
        proxy.start()
        try:
            proxy.wait_ready()
            assert proxy.port != taken
            assert proxy.get("/api/v1/flags/", headers={"X-Environment-Key": "env_client_key_1"}).status_code == 200
            assert f"port {taken} was taken" in proxy.log()
        finally:
            proxy.stop()
