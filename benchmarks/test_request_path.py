"""The request path in process, per request: raw ASGI calls (tests/asgi.py) into the proxy's application and
into the floors, the same fixed bytes from a raw ASGI callable and from BlackSheep (benchmarks/ceiling.py).

No server and no sockets, so these show what the application itself costs. Each benchmark round is a batch
of BATCH requests: divide the times by BATCH for µs per request, and compare the proxy with the floor of the
same method from the same run (the box is shared: absolute numbers drift, ratios much less).

    .venv/bin/pytest benchmarks/test_request_path.py --benchmark-enable --benchmark-only
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import uvloop

from benchmarks.ceiling import create_app as blacksheep_floor
from benchmarks.ceiling import raw_floor
from benchmarks.documents import heavy_document
from tests.asgi import Asgi, call
from tests.inprocess import InProcessProxy, settings_for
from tests.support import conformance_documents

BATCH = 100
ROUNDS = 60
CLIENT = [(b"x-environment-key", b"env_client_key_1")]
JSON = [(b"content-type", b"application/json")]
SAME_BODY = (
    b'{"identifier":"do_it_all_in_one_go_identity","traits":[{"trait_key":"age","trait_value":30},'
    b'{"trait_key":"beta","trait_value":true}]}'
)
counter = itertools.count()


def random_identity() -> bytes:
    return (
        b'{"identifier":"user-%d","traits":[{"trait_key":"plan","trait_value":"premium"},'
        b'{"trait_key":"age","trait_value":30},{"trait_key":"country","trait_value":"GB"}]}' % next(counter)
    )


def random_context() -> bytes:
    return b'{"context":{"targetingKey":"user-%d","plan":"premium","age":30,"country":"GB"}}' % next(counter)


# scenario → (method, target, headers, body maker or fixed body)
SCENARIOS: dict[str, tuple[str, bytes, list[tuple[bytes, bytes]], bytes | Callable[[], bytes]]] = {
    "get_flags": ("GET", b"/api/v1/flags/", CLIENT, b""),
    "post_identity_same": ("POST", b"/api/v1/identities/", CLIENT + JSON, SAME_BODY),
    "get_identity_random": ("GET", b"", CLIENT, b""),  # target made per request
    "post_identity_random": ("POST", b"/api/v1/identities/", CLIENT + JSON, random_identity),
    "ofrep_flag_random": ("POST", b"/ofrep/v1/evaluate/flags/max_items", CLIENT + JSON, random_context),
}


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    created = uvloop.new_event_loop()  # as in the workers
    yield created
    created.close()


def batch(loop: asyncio.AbstractEventLoop, app: Asgi, scenario: str) -> Callable[[], Any]:
    method, target, headers, body = SCENARIOS[scenario]

    async def run() -> int:
        status = 0
        for _ in range(BATCH):
            path = target or b"/api/v1/identities/?identifier=user-%d" % next(counter)
            sent = await call(app, method, path, headers, body() if callable(body) else body)
            status |= sent.status
        return status

    def one_batch() -> int:
        return loop.run_until_complete(run())

    return one_batch


@pytest.fixture(scope="module")
def proxies() -> Iterator[dict[str, InProcessProxy]]:
    heavy = {**conformance_documents(), "ser.env_server_key_1": heavy_document()}
    blacksheep = settings_for(server={"fast_path": False})
    apps = {
        "default": InProcessProxy(settings_for(), conformance_documents()),  # the fast path in front
        "blacksheep": InProcessProxy(blacksheep, conformance_documents()),  # every request through BlackSheep
        "heavy": InProcessProxy(settings_for(), heavy),
    }
    yield apps
    for app in apps.values():
        app.close()


@pytest.mark.parametrize(
    ("profile", "scenario"),
    [
        *(("default", name) for name in SCENARIOS),
        *(("blacksheep", name) for name in SCENARIOS),
        ("heavy", "post_identity_random"),
    ],
)
def test_proxy(
    benchmark: Any, loop: asyncio.AbstractEventLoop, proxies: dict[str, InProcessProxy], profile: str, scenario: str
) -> None:
    one_batch = batch(loop, proxies[profile].asgi, scenario)
    assert one_batch() == 200
    benchmark.pedantic(one_batch, rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("floor", ["raw_asgi", "blacksheep"])
def test_floor(benchmark: Any, loop: asyncio.AbstractEventLoop, floor: str, method: str) -> None:
    app: Any = raw_floor() if floor == "raw_asgi" else blacksheep_floor()
    if floor == "blacksheep":
        loop.run_until_complete(app.start())
    body = orjson.dumps({"identifier": "x"})

    async def run() -> int:
        status = 0
        for _ in range(BATCH):
            sent = await call(app, method, b"/api/v1/identities/", CLIENT + JSON, body if method == "POST" else b"")
            status |= sent.status
        return status

    assert loop.run_until_complete(run()) == 200
    benchmark.pedantic(lambda: loop.run_until_complete(run()), rounds=ROUNDS, warmup_rounds=2)
