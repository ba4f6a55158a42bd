"""OFREP against a real proxy: the official OpenFeature SDKs with their OFREP providers (Python
`openfeature-sdk` + `openfeature-provider-ofrep`, Node `@openfeature/server-sdk` + `@openfeature/ofrep-provider`),
the bulk endpoint's ETags, keys and filters, and bad requests.

The oracle is `/api/v1/flags/` and `/api/v1/identities/` on the same proxy: every flag, evaluated as every
type, must give what the mapping (README, "OpenFeature") makes of that flag's `enabled` and
`feature_state_value`, subject to each SDK's own type check.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagEvaluationDetails, Reason

from proxy.http.identity_request import MAX_TRAIT_STRING
from proxy.http.ofrep import MAX_CONTEXT_ENTRIES
from tests.support import TESTS, ProxyProcess, conformance_documents, npm_install, proxy_config, serving, wait_for

NODE_DIR = TESTS / "ofrep_node"
MAX_BODY = 16384

CLIENT_1, SERVER_1 = "env_client_key_1", "ser.env_server_key_1"
CLIENT_2, SERVER_2 = "env_client_key_2", "ser.env_server_key_2"  # env2 has hide_disabled_flags

# (identifier, traits); None: environment flags
CONTEXTS: list[tuple[str, dict[str, Any]] | None] = [
    None,
    ("user-42", {"plan": "premium", "age": 30}),
    ("vip-user-1", {}),
    ("tester@example.com", {"beta": True}),
    ("someone", {"country": "GB", "app_version": "2.3.1"}),
]

DEFAULTS: dict[str, Any] = {
    "boolean": False,
    "string": "code-default",
    "integer": -1,
    "float": -1.5,
    "object": {"d": 1},
}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    def config(api_url: str) -> dict[str, object]:
        return proxy_config(api_url, max_request_body_bytes=MAX_BODY)

    with serving(tmp_path_factory.mktemp("ofrep"), conformance_documents(), config) as proxy:
        yield proxy


# -- the mapping and the oracle --------------------------------------------------------------------


def ofrep_value(enabled: bool, value: Any) -> Any:
    """The README's mapping, restated: disabled → false; no value or a boolean → true; else the value
    (a JSON-object string parsed)."""
    if not enabled:
        return False
    if value is None or value == "" or isinstance(value, bool):
        return True
    if isinstance(value, str) and value.startswith("{"):
        return json.loads(value)
    return value


def oracle(proxy: ProxyProcess, key: str, context: tuple[str, dict[str, Any]] | None) -> dict[str, tuple[bool, Any]]:
    """flag name → (enabled, feature_state_value) as the Flagsmith API endpoints give them."""
    headers = {"X-Environment-Key": key}
    if context is None:
        flags = httpx.get(f"{proxy.url}/api/v1/flags/", headers=headers).json()
    else:
        identifier, traits = context
        body = {"identifier": identifier, "traits": [{"trait_key": k, "trait_value": v} for k, v in traits.items()]}
        flags = httpx.post(f"{proxy.url}/api/v1/identities/", json=body, headers=headers).json()["flags"]
    return {flag["feature"]["name"]: (flag["enabled"], flag["feature_state_value"]) for flag in flags}


def metric(proxy: ProxyProcess, name: str, labels: str) -> float:
    found = re.search(rf"^{name}{{{re.escape(labels)}}} ([0-9.]+)$", httpx.get(f"{proxy.url}/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def ofrep_context(context: tuple[str, dict[str, Any]] | None) -> dict[str, Any]:
    return {} if context is None else {"targetingKey": context[0], **context[1]}


PYTHON_TYPES: dict[str, Any] = {"boolean": bool, "string": str, "integer": int, "float": float, "object": dict}


def python_expectation(kind: str, value: Any) -> tuple[Any, str | None]:
    # The Python SDK's and provider's check: isinstance (so a boolean passes as an integer).
    if isinstance(value, PYTHON_TYPES[kind]):
        return value, None
    return DEFAULTS[kind], "TYPE_MISMATCH"


def js_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else "object"


# -- Python SDK ------------------------------------------------------------------------------------


@pytest.fixture
def openfeature_client(proxy: ProxyProcess) -> Iterator[Any]:
    def client(key: str, header: str = "X-Environment-Key") -> Any:
        value = f"Bearer {key}" if header == "Authorization" else key
        domain = f"{header}:{key}"
        api.set_provider(OFREPProvider(proxy.url, headers_factory=lambda: {header: value}), domain)
        return api.get_client(domain)

    yield client
    api.clear_providers()


def evaluate(client: Any, kind: str, flag: str, context: dict[str, Any]) -> FlagEvaluationDetails[Any]:
    attributes = {k: v for k, v in context.items() if k != "targetingKey"}
    evaluation_context = EvaluationContext(context.get("targetingKey"), attributes)
    getter = getattr(client, f"get_{kind}_details")
    return getter(flag, DEFAULTS[kind], evaluation_context)


@pytest.mark.parametrize("context", CONTEXTS, ids=lambda c: c[0] if c else "environment")
def test_python_sdk_every_flag_as_every_type_matches_the_api(proxy: ProxyProcess, openfeature_client: Any, context):
    client = openfeature_client(SERVER_1, "Authorization")
    flags = oracle(proxy, SERVER_1, context)
    assert len(flags) == 20
    for flag, (enabled, raw) in flags.items():
        value = ofrep_value(enabled, raw)
        for kind in PYTHON_TYPES:
            details = evaluate(client, kind, flag, ofrep_context(context))
            expected_value, expected_error = python_expectation(kind, value)
            got = (details.value, details.error_code and details.error_code.value)
            assert got == (expected_value, expected_error), (flag, kind, raw)
            if expected_error is None:
                assert (details.reason == Reason.DISABLED) == (not enabled), (flag, details.reason)
                assert details.flag_metadata["enabled"] == enabled
                assert details.flag_metadata.get("featureStateValue") == raw


def test_python_sdk_values_reasons_and_variants(openfeature_client: Any) -> None:
    client = openfeature_client(SERVER_1)
    environment: dict[str, Any] = {}
    premium = {"targetingKey": "user-42", "plan": "premium", "age": 30}

    details = evaluate(client, "string", "banner_text", environment)
    # The engine's DEFAULT (environment default served) is OpenFeature's STATIC, as in Flagsmith's provider.
    assert (details.value, details.reason, details.variant) == ("Welcome!", Reason.STATIC, "enabled")
    assert details.flag_metadata["flagsmithReason"] == "DEFAULT"
    assert evaluate(client, "integer", "max_items", environment).value == 25
    assert evaluate(client, "float", "feature_with_float", environment).value == 3.14
    assert evaluate(client, "object", "json_config", environment).value == {"retries": 3, "timeout_ms": 250}
    assert evaluate(client, "boolean", "dark_mode", environment).value is True
    assert evaluate(client, "boolean", "welcome_email", environment).value is True  # "" is no value

    disabled = evaluate(client, "boolean", "maintenance_mode", environment)
    assert (disabled.value, disabled.reason, disabled.variant) == (False, Reason.DISABLED, "disabled")
    assert disabled.flag_metadata["featureStateValue"] == "scheduled"
    as_string = evaluate(client, "string", "maintenance_mode", environment)
    assert (as_string.value, as_string.error_code) == ("code-default", ErrorCode.TYPE_MISMATCH)

    segment = evaluate(client, "integer", "max_items", premium)
    assert (segment.value, segment.reason) == (100, Reason.TARGETING_MATCH)
    assert segment.flag_metadata["flagsmithReason"] == "TARGETING_MATCH; segment=premium_plan"
    override = evaluate(client, "integer", "max_items", {"targetingKey": "vip-user-1"})
    assert (override.value, override.reason) == (999, Reason.TARGETING_MATCH)
    split = evaluate(client, "string", "search_algorithm", premium)
    assert (split.value, split.reason) == ("vector", Reason.SPLIT)
    control = evaluate(client, "string", "onboarding_flow", {"targetingKey": "someone"})
    assert (control.value, control.variant, control.flag_metadata["experiment.arm"]) == (
        "classic",
        "control",
        "control",
    )

    # The Flagsmith provider's conventions: a nested `traits` object, and `transient` is not a trait.
    nested = evaluate(client, "integer", "max_items", {"targetingKey": "user-42", "traits": {"plan": "premium"}})
    assert nested.value == 100
    transient = evaluate(client, "integer", "max_items", {"targetingKey": "user-1", "transient": True})
    assert (transient.value, transient.reason) == (25, Reason.STATIC)


def test_python_sdk_unknown_flag_gives_the_default(openfeature_client: Any) -> None:
    details = evaluate(openfeature_client(CLIENT_1), "string", "no_such_flag", {"targetingKey": "u"})
    assert (details.value, details.error_code, details.reason) == (
        "code-default",
        ErrorCode.FLAG_NOT_FOUND,
        Reason.ERROR,
    )
    assert "no_such_flag" in (details.error_message or "")


def test_python_sdk_keys_see_what_the_api_shows_them(openfeature_client: Any) -> None:
    context = {"targetingKey": "user-42"}
    server_only = evaluate(openfeature_client(CLIENT_1), "string", "secret_server_flag", context)
    assert server_only.error_code == ErrorCode.FLAG_NOT_FOUND
    assert evaluate(openfeature_client(SERVER_1), "string", "secret_server_flag", context).value == "s3cr3t"
    # env2 hides disabled flags from client keys only.
    hidden = evaluate(openfeature_client(CLIENT_2, "Authorization"), "boolean", "legacy_api", context)
    assert hidden.error_code == ErrorCode.FLAG_NOT_FOUND
    shown = evaluate(openfeature_client(SERVER_2), "boolean", "legacy_api", context)
    assert (shown.value, shown.reason) == (False, Reason.DISABLED)
    unknown_key = evaluate(openfeature_client("not-a-key"), "string", "banner_text", context)
    assert (unknown_key.value, unknown_key.error_code) == ("code-default", ErrorCode.GENERAL)


# -- Node SDK --------------------------------------------------------------------------------------


def node_modules() -> None:
    npm_install(NODE_DIR, "the Node OFREP test")


def run_node(proxy: ProxyProcess, groups: list[dict[str, Any]], script: str = "evaluate.mjs", **args: Any) -> Any:
    node_modules()
    done = subprocess.run(
        ["node", script],
        cwd=NODE_DIR,
        input=json.dumps({"baseUrl": proxy.url, "groups": groups, **args}).encode(),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


NODE_DEFAULTS: dict[str, Any] = {"boolean": False, "string": "code-default", "number": -1, "object": {"d": 1}}


def test_node_sdk_every_flag_as_every_type_matches_the_api(proxy: ProxyProcess) -> None:
    cases, expected = [], []
    for context in CONTEXTS:
        for flag, (enabled, raw) in oracle(proxy, SERVER_1, context).items():
            value = ofrep_value(enabled, raw)
            for kind, default in NODE_DEFAULTS.items():
                cases.append({"flag": flag, "type": kind, "default": default, "context": ofrep_context(context)})
                ok = js_type(value) == kind
                expected.append((value if ok else default, None if ok else "TYPE_MISMATCH", enabled, raw))
    extra = [
        {"flag": "no_such_flag", "type": "string", "default": "code-default", "context": {"targetingKey": "u"}},
        {"flag": "secret_server_flag", "type": "string", "default": "code-default", "context": {}},
    ]
    results = run_node(
        proxy,
        [
            {"headers": {"Authorization": f"Bearer {SERVER_1}"}, "cases": cases},
            {"headers": {"X-Environment-Key": CLIENT_1}, "cases": extra},
        ],
    )
    assert len(results) == len(cases) + len(extra)
    for case, result, (value, error, enabled, raw) in zip(cases, results, expected, strict=False):
        assert (result["value"], result["errorCode"]) == (value, error), (case, raw)
        if error is None:
            assert (result["reason"] == "DISABLED") == (not enabled)
            assert result["flagMetadata"]["enabled"] == enabled
            assert result["flagMetadata"].get("featureStateValue") == raw
    not_found, server_only = results[len(cases) :]
    assert (not_found["value"], not_found["errorCode"]) == ("code-default", "FLAG_NOT_FOUND")
    assert (server_only["value"], server_only["errorCode"]) == ("code-default", "FLAG_NOT_FOUND")


def test_node_sdk_reasons(proxy: ProxyProcess) -> None:
    premium = {"targetingKey": "user-42", "plan": "premium", "age": 30}
    cases = [
        {"flag": "banner_text", "type": "string", "default": "", "context": {}},
        {"flag": "max_items", "type": "number", "default": 0, "context": premium},
        {"flag": "search_algorithm", "type": "string", "default": "", "context": premium},
        {"flag": "maintenance_mode", "type": "boolean", "default": True, "context": premium},
    ]
    results = run_node(proxy, [{"headers": {"X-Environment-Key": SERVER_1}, "cases": cases}])
    assert [(r["value"], r["reason"]) for r in results] == [
        ("Welcome!", "STATIC"),
        (100, "TARGETING_MATCH"),
        ("vector", "SPLIT"),
        (False, "DISABLED"),
    ]


OFREP_304 = 'method="POST",response_status="304",route="/ofrep/v1/evaluate/flags"'


def test_node_web_sdk_bulk_evaluation_and_etag_polling(proxy: ProxyProcess) -> None:
    """The static-context provider: one bulk request per context, then polls answered 304 while nothing changes."""
    contexts = [CONTEXTS[1], CONTEXTS[4], CONTEXTS[0]]
    names = list(oracle(proxy, SERVER_1, None))
    cases = [{"flag": f, "type": t, "default": d} for f in [*names, "no_such_flag"] for t, d in NODE_DEFAULTS.items()]
    polled_before = metric(proxy, "flagsmith_http_server_requests_total", OFREP_304)
    results = run_node(
        proxy,
        [],
        "static.mjs",
        headers={"X-Environment-Key": CLIENT_1},
        pollMs=100,
        waitMs=700,
        contexts=[ofrep_context(c) for c in contexts],
        cases=cases,
    )
    assert len(results) == len(contexts)
    for context, answers in zip(contexts, results, strict=True):
        flags = oracle(proxy, CLIENT_1, context)  # the client key: secret_server_flag is not there
        for case, answer in zip(cases, answers, strict=True):
            if case["flag"] not in flags:
                assert (answer["value"], answer["errorCode"]) == (case["default"], "FLAG_NOT_FOUND"), case
                continue
            enabled, raw = flags[case["flag"]]
            value = ofrep_value(enabled, raw)
            ok = js_type(value) == case["type"]
            assert (answer["value"], answer["errorCode"]) == (
                value if ok else case["default"],
                None if ok else "TYPE_MISMATCH",
            )
    polled = metric(proxy, "flagsmith_http_server_requests_total", OFREP_304) - polled_before
    assert polled >= 2, "the provider's polls should have been answered 304 Not Modified"


# -- bulk evaluation -------------------------------------------------------------------------------


def post(proxy: ProxyProcess, path: str, body: Any, key: str | None = SERVER_1, **headers: str) -> httpx.Response:
    if key is not None:
        headers["X-Environment-Key"] = key
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{proxy.url}/ofrep/v1/evaluate/flags{path}", content=content, headers=headers, timeout=10)


def test_client_keys_are_not_told_segment_names(proxy: ProxyProcess) -> None:
    """Segment names are internal (/api/v1/ never shows them to client keys); before, the client key's
    `flagsmithReason` read `TARGETING_MATCH; segment=premium_plan`."""
    premium = {"context": {"targetingKey": "user-42", "plan": "premium"}}
    for path in ("/max_items", ""):
        for key, reason in ((CLIENT_1, "TARGETING_MATCH"), (SERVER_1, "TARGETING_MATCH; segment=premium_plan")):
            answer = post(proxy, path, premium, key).json()
            flag = answer if path else next(f for f in answer["flags"] if f["key"] == "max_items")
            assert (flag["reason"], flag["metadata"]["flagsmithReason"]) == ("TARGETING_MATCH", reason), (path, key)
    overridden = post(proxy, "/max_items", {"context": {"targetingKey": "vip-user-1"}}, CLIENT_1).json()
    assert (overridden["value"], overridden["metadata"]["flagsmithReason"]) == (999, "TARGETING_MATCH")
    assert "segment=" not in post(proxy, "", premium, CLIENT_1).text


@pytest.mark.parametrize("context", CONTEXTS, ids=lambda c: c[0] if c else "environment")
def test_bulk_matches_single_flags_and_the_api(proxy: ProxyProcess, context) -> None:
    for key in (SERVER_1, CLIENT_1, CLIENT_2):
        flags = oracle(proxy, key, context)
        body = {"context": ofrep_context(context)}
        response = post(proxy, "", body, key)
        assert response.status_code == 200
        bulk = response.json()["flags"]
        assert [entry["key"] for entry in bulk] == list(flags)  # what this key sees, in document order
        for entry in bulk:
            enabled, raw = flags[entry["key"]]
            assert entry["value"] == ofrep_value(enabled, raw)
            assert entry["reason"] in ("STATIC", "TARGETING_MATCH", "SPLIT", "DISABLED")
            assert isinstance(entry["variant"], str)
            assert post(proxy, f"/{entry['key']}", body, key).json() == entry


def test_bulk_etag_and_if_none_match(proxy: ProxyProcess) -> None:
    context = {"context": {"targetingKey": "user-42", "plan": "premium"}}
    first = post(proxy, "", context)
    etag = first.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{24}"', etag)
    # The same context in another key order is the same evaluation.
    reordered = {"context": {"plan": "premium", "targetingKey": "user-42"}}
    assert post(proxy, "", reordered).headers["etag"] == etag
    for if_none_match in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = post(proxy, "", context, **{"If-None-Match": if_none_match})
        assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    assert post(proxy, "", context, **{"If-None-Match": '"stale"'}).status_code == 200
    other = post(proxy, "", {"context": {"targetingKey": "user-42"}})
    assert other.status_code == 200 and other.headers["etag"] != etag
    assert post(proxy, "", context, CLIENT_1).headers["etag"] != etag  # the client key sees fewer flags


def test_bulk_is_gzipped_when_asked(proxy: ProxyProcess) -> None:
    plain = post(proxy, "", {"context": {}}, **{"Accept-Encoding": "identity"})
    zipped = post(proxy, "", {"context": {}}, **{"Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.json() == plain.json() and zipped.headers["etag"] == plain.headers["etag"]


def test_cors_exposes_the_etag(proxy: ProxyProcess) -> None:
    response = post(proxy, "", {"context": {}}, Origin="https://app.example.com")
    assert "etag" in response.headers["access-control-expose-headers"].lower()


def test_repeated_contexts_come_from_the_identity_cache(proxy: ProxyProcess) -> None:
    def cache(result: str) -> float:
        return metric(proxy, "edge_proxy_identity_cache_total", f'result="{result}"')

    context = {"context": {"targetingKey": "cache-check", "n": 1}}
    post(proxy, "/max_items", context)
    hits, misses = cache("hit"), cache("miss")
    post(proxy, "", context)  # the bulk body and every single flag share one entry
    post(proxy, "/banner_text", {"context": {"n": 1, "targetingKey": "cache-check"}})
    assert (cache("hit") - hits, cache("miss") - misses) == (2, 0)
    post(proxy, "", {"context": {"targetingKey": "cache-check", "n": 1.0}})  # 1.0 is not 1 for the engine
    assert cache("miss") - misses == 1


# -- keys, routes and bad requests -----------------------------------------------------------------


def test_keys_in_every_header_and_unknown_keys(proxy: ProxyProcess) -> None:
    for headers in ({"X-Environment-Key": SERVER_1}, {"Authorization": f"Bearer {SERVER_1}"}, {"X-API-Key": SERVER_1}):
        assert post(proxy, "/secret_server_flag", {"context": {}}, None, **headers).json()["value"] == "s3cr3t"
    for headers in ({}, {"X-Environment-Key": "nope"}, {"Authorization": "Bearer nope"}, {"Authorization": SERVER_1}):
        single = post(proxy, "/banner_text", {"context": {}}, None, **headers)
        assert single.status_code == 401, headers
        assert single.json()["key"] == "banner_text" and single.json()["errorCode"] == "GENERAL"
        bulk = post(proxy, "", {"context": {}}, None, **headers)
        assert bulk.status_code == 401 and set(bulk.json()) == {"errorCode", "errorDetails"}


def test_routes_405_and_metrics_labels(proxy: ProxyProcess) -> None:
    for path in ("/ofrep/v1/evaluate/flags/banner_text", "/ofrep/v1/evaluate/flags/banner_text/"):
        response = httpx.get(proxy.url + path)
        assert (response.status_code, response.headers["allow"]) == (405, "POST")
    assert httpx.get(proxy.url + "/ofrep/v1/evaluate/flags").status_code == 405
    assert httpx.get(proxy.url + "/ofrep/v1/evaluate/flags/a/b").status_code == 404
    assert post(proxy, "/", {"context": {}}).json()["flags"]  # a trailing slash is the bulk endpoint
    metrics = httpx.get(f"{proxy.url}/metrics").text
    # labelled by route template, as Flagsmith's API labels its own
    assert 'method="GET",response_status="405",route="/ofrep/v1/evaluate/flags/{key}"' in metrics
    assert 'method="POST",response_status="200",route="/ofrep/v1/evaluate/flags"' in metrics


def test_empty_or_null_context_is_the_environment(proxy: ProxyProcess) -> None:
    for body in ({}, {"context": None}, {"context": {}}, {"context": {"targetingKey": ""}}):
        response = post(proxy, "/max_items", body)
        assert (response.status_code, response.json()["value"], response.json()["reason"]) == (200, 25, "STATIC")


def test_the_body_is_json_whatever_its_content_type(proxy: ProxyProcess) -> None:
    body = {"context": {"targetingKey": "user-42", "plan": "premium"}}
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):  # `curl -d`; a browser's simple POST
        response = post(proxy, "/max_items", body, **{"Content-Type": content_type})
        assert (response.status_code, response.json()["value"]) == (200, 100)


def context(**entries: Any) -> bytes:
    return json.dumps({"context": {"targetingKey": "u", **entries}}).encode()


LONG = "x" * (MAX_TRAIT_STRING + 1)
# (name, body, headers, errorCode, a fragment of errorDetails)
BAD_REQUESTS: list[tuple[str, bytes, dict[str, str], str, str]] = [
    ("no body", b"", {}, "PARSE_ERROR", "empty"),
    ("not JSON", b"{context:", {}, "PARSE_ERROR", "not valid JSON"),
    ("not an object", b"[1, 2]", {}, "PARSE_ERROR", "an array"),
    ("context a string", b'{"context": "user-1"}', {}, "INVALID_CONTEXT", "context must be an object"),
    ("context a list", b'{"context": [1]}', {}, "INVALID_CONTEXT", "context must be an object"),
    ("nested value", context(plan={"tier": 1}), {}, "INVALID_CONTEXT", "context.plan"),
    ("list value", context(tags=["a"]), {}, "INVALID_CONTEXT", "context.tags"),
    ("traits not an object", context(traits=[1]), {}, "INVALID_CONTEXT", "context.traits"),
    ("nested trait", context(traits={"a": {}}), {}, "INVALID_CONTEXT", "context.a"),
    ("targetingKey a number", b'{"context": {"targetingKey": 42}}', {}, "INVALID_CONTEXT", "targetingKey"),
    ("traits without identity", b'{"context": {"plan": "premium"}}', {}, "TARGETING_KEY_MISSING", "targetingKey"),
    ("long value", context(a=LONG), {}, "INVALID_CONTEXT", f"{MAX_TRAIT_STRING} characters"),
    ("long key", context(**{LONG: 1}), {}, "INVALID_CONTEXT", f"{MAX_TRAIT_STRING} characters"),
    ("long targetingKey", json.dumps({"context": {"targetingKey": LONG}}).encode(), {}, "INVALID_CONTEXT", "longer"),
    ("too many entries", context(**{str(i): 1 for i in range(MAX_CONTEXT_ENTRIES)}), {}, "INVALID_CONTEXT", "entries"),
    ("over the body cap", context(a="x" * MAX_BODY), {}, "INVALID_CONTEXT", f"{MAX_BODY} bytes"),
]


@pytest.mark.parametrize(("name", "body", "headers", "code", "detail"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_answer_the_spec_error_shapes(proxy: ProxyProcess, name, body, headers, code, detail) -> None:
    single = post(proxy, "/max_items", body, **headers)
    assert single.status_code == 400, single.text
    assert (single.json()["key"], single.json()["errorCode"]) == ("max_items", code)
    assert detail in single.json()["errorDetails"]
    bulk = post(proxy, "", body, **headers)
    assert bulk.status_code == 400, bulk.text
    assert set(bulk.json()) == {"errorCode", "errorDetails"} and bulk.json()["errorCode"] == code


def test_a_chunked_body_over_the_cap(proxy: ProxyProcess) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"context": {"targetingKey": "u", "a": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"x" * 1024
        yield b'"}}'

    response = httpx.post(
        f"{proxy.url}/ofrep/v1/evaluate/flags", content=chunks(), headers={"X-Environment-Key": SERVER_1}
    )
    assert (response.status_code, response.json()["errorCode"]) == (400, "INVALID_CONTEXT")


# -- pure pieces -----------------------------------------------------------------------------------


def test_engine_errors_and_unknown_reasons() -> None:
    from proxy.area.bodies import KeyKind
    from proxy.evaluation.engine import FlagResult
    from proxy.http.app import route_of
    from proxy.http.ofrep import flag_entry

    feature = {"id": 7, "name": "f", "type": "STANDARD"}
    status, entry = flag_entry(FlagResult(feature, True, 1, "ERROR; code=CIRCULAR_DEPENDENCY", None), KeyKind.SERVER)
    assert (status, entry["errorCode"], entry["key"]) == (400, "GENERAL", "f")
    unknown = FlagResult(feature, True, 1, "SOMETHING_NEW; x=1", None)
    assert flag_entry(unknown, KeyKind.CLIENT)[1]["reason"] == "UNKNOWN"
    assert (
        route_of(b"/ofrep/v1/evaluate/flags/f")
        == route_of(b"/ofrep/v1/evaluate/flags/f/")
        == ("/ofrep/v1/evaluate/flags/{key}", b"POST")
    )
    assert route_of(b"/ofrep/v1/evaluate/flags/") == ("/ofrep/v1/evaluate/flags", b"POST")
    assert route_of(b"/ofrep/v1/evaluate/flags/a/b") is None


def test_the_identity_cache_keeps_whole_evaluations() -> None:
    from proxy.area.bodies import KeyKind
    from proxy.evaluation.engine import FlagResult
    from proxy.http.ofrep import Evaluation, encode_evaluation
    from proxy.worker.response_cache import ResponseCache

    results = [
        FlagResult({"id": i, "name": f"f{i}", "type": "STANDARD"}, True, "x" * 100, "STATIC", None) for i in range(20)
    ]
    evaluation = encode_evaluation(results, KeyKind.CLIENT)
    cache = ResponseCache(10, 1024 * 1024)
    cache.put("env", ("ofrep", 0, "u", ()), evaluation)
    cached = cache.get("env", ("ofrep", 0, "u", ()))
    assert isinstance(cached, Evaluation) and cached == evaluation
    # The single answers are counted: about as many bytes again as the bulk body.
    assert cache.size_bytes > 2 * len(evaluation.plain)


def test_usage_reporting_counts_ofrep_answers_as_flags_and_identities(upstream, start_proxy) -> None:
    from tests.system.test_discovery import discovering, environment, key

    upstream.proxy_config = [environment(CLIENT_1, key(SERVER_1))]
    proxy = start_proxy(discovering(upstream, usage_flush_interval_seconds=1))
    proxy.wait_ready()
    for body in ({"context": {}}, {"context": {"targetingKey": "u"}}):
        assert post(proxy, "/banner_text", body, CLIENT_1).status_code == 200
        assert post(proxy, "", body, CLIENT_1).status_code == 200
    assert post(proxy, "/no_such_flag", {"context": {}}, CLIENT_1).status_code == 404  # not an answer

    def reported() -> dict[str, int]:
        totals: dict[str, int] = {}
        for report in upstream.usage:
            for row in report["rows"]:
                totals[row["resource"]] = totals.get(row["resource"], 0) + row["count"]
        return totals

    assert wait_for(lambda: reported() == {"flags": 2, "identities": 2}, 15), (reported(), proxy.log())
