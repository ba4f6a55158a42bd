"""OpenFeature Remote Evaluation Protocol (OFREP 0.3): `POST /ofrep/v1/evaluate/flags[/{key}]`.

A Flagsmith flag has `enabled` and `feature_state_value`; an OFREP flag has one `value`. The mapping
follows the defaults of Flagsmith's own OpenFeature provider (`openfeature-provider-flagsmith`:
`use_boolean_config_value=False`, `return_value_for_disabled_flags=False`, `use_flagsmith_defaults=False`),
so a flag evaluated through either gives the same value wherever one value can (README, "OpenFeature"):

* disabled → `false`, reason `DISABLED` (a boolean evaluation gets `false`, any other type its code default);
* enabled with no value (null, `""`) or a boolean value → `true` (booleans come from `enabled`);
* enabled with a string, number or JSON-object string → that value (the JSON object parsed).

Reasons are the engine's without their detail (`TARGETING_MATCH; segment=x` → `TARGETING_MATCH`), except
that the engine's `DEFAULT` (environment default served) is `STATIC`, as in that provider: OpenFeature's
DEFAULT means the code default. Every flag carries `metadata` with `enabled`, `featureId`, the raw
`featureStateValue` and `flagsmithReason`, and for multivariate picks the provider's `experiment.*` keys.

One identity's (or the environment's) evaluation is encoded once, as the bulk body plus each flag's
single-flag body, and kept in the worker's identity LRU, so both endpoints and repeated contexts share it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import orjson

from proxy.area.bodies import Body, KeyKind
from proxy.evaluation.engine import FlagResult
from proxy.http.errors import PayloadTooLarge, ProxyError, RequestInvalid
from proxy.http.exchange import Call, Headers, Reply
from proxy.http.identities import IdentityPipeline, Parsed, traits_key
from proxy.http.identity_request import MAX_TRAIT_STRING
from proxy.http.responses import accepts_gzip, negotiated
from proxy.worker.response_cache import key_cost
from proxy.worker.served import Served

# Far above any real evaluation context; bounds what one request can make the worker hash and keep.
MAX_CONTEXT_ENTRIES = 1000
# Context entries that are not traits: the Flagsmith provider's conventions (a nested `traits` object,
# and `transient`, which asks Flagsmith not to store the identity: the proxy never stores one anyway).
NOT_TRAITS = ("targetingKey", "traits", "transient")
SCALARS = (str, bool, int, float, type(None))
SINGLE_OVERHEAD = 33 + 56 + 100  # a bytes object's header, a 2-tuple, the dict slot (sys.getsizeof)
ETAG_BYTES = 33 + 26 + 64 + 64  # the tag (a bytes object), its list cell, the single dict's own header
REASONS = {"STATIC": "STATIC", "DEFAULT": "STATIC", "TARGETING_MATCH": "TARGETING_MATCH", "SPLIT": "SPLIT"}


class OfrepError(ProxyError):
    """An OFREP error answer: `{"key"?, "errorCode", "errorDetails"}` with its HTTP status."""

    def __init__(self, status: int, code: str, details: str, key: str | None = None) -> None:
        super().__init__(details)
        self.status = status
        self.code = code
        self.key = key

    def body(self) -> bytes:
        body: dict[str, Any] = {"errorCode": self.code, "errorDetails": self.message}
        if self.key is not None:
            body = {"key": self.key, **body}
        return orjson.dumps(body)


def _invalid(details: str) -> OfrepError:
    return OfrepError(400, "INVALID_CONTEXT", details)


# -- request: key and context --------------------------------------------------------------------


def request_key(call: Call) -> bytes | None:
    """The environment key: `X-Environment-Key`, `Authorization: Bearer <key>`, or the spec's `X-API-Key`."""
    key = call.header(b"x-environment-key")
    if key:
        return key
    auth = call.header(b"authorization")
    if auth and auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    return call.header(b"x-api-key")


def parse_context(raw: bytes) -> tuple[str | None, dict[str, Any]]:
    """`{"context": {...}}` → (identifier or None for environment flags, traits). Raises OfrepError.

    The body is read as JSON whatever its Content-Type says (`curl -d` sends a form type): the protocol
    has only JSON bodies, and nothing here needs the header to be right."""
    if not raw.strip():
        raise OfrepError(400, "PARSE_ERROR", 'the request body is empty: send {"context": {...}}')
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OfrepError(400, "PARSE_ERROR", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OfrepError(400, "PARSE_ERROR", f"the request body must be a JSON object, not {_kind(data)}")
    context = data.get("context")
    if context is None:  # the Python OFREP provider sends `{}` when it has no context
        return None, {}
    if not isinstance(context, dict):
        raise _invalid(f"context must be an object, not {_kind(context)}")
    nested = context.get("traits")
    if nested is not None and not isinstance(nested, dict):
        raise _invalid(f"context.traits must be an object, not {_kind(nested)}")
    if len(context) + len(nested or ()) > MAX_CONTEXT_ENTRIES:
        raise _invalid(f"context has more than {MAX_CONTEXT_ENTRIES} entries")
    traits = {name: value for name, value in context.items() if name not in NOT_TRAITS}
    traits.update(nested or {})  # the nested object wins, as in the Flagsmith provider
    for name, value in traits.items():
        _check_trait(name, value)
    identifier = context.get("targetingKey")
    if identifier is not None and not isinstance(identifier, str):
        raise _invalid(f"context.targetingKey must be a string, not {_kind(identifier)}")
    if identifier and len(identifier) > MAX_TRAIT_STRING:
        raise _invalid(f"context.targetingKey is longer than {MAX_TRAIT_STRING} characters")
    if not identifier:
        if traits:
            # Flagsmith keeps traits on identities: without one, nothing could target on them.
            raise OfrepError(
                400, "TARGETING_KEY_MISSING", "context has traits but no targetingKey: traits need an identity"
            )
        return None, {}
    return identifier, traits


def _check_trait(name: str, value: Any) -> None:
    if len(name) > MAX_TRAIT_STRING:
        raise _invalid(f"a context key is longer than {MAX_TRAIT_STRING} characters")
    if not isinstance(value, SCALARS):
        raise _invalid(f"context.{name} must be a string, number, boolean or null, not {_kind(value)}")
    if isinstance(value, str) and len(value) > MAX_TRAIT_STRING:
        raise _invalid(f"context.{name} is longer than {MAX_TRAIT_STRING} characters")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


# -- response: the mapping -----------------------------------------------------------------------


def flag_entry(result: FlagResult, kind: KeyKind) -> tuple[int, dict[str, Any]]:
    """One evaluated flag → (HTTP status of its single-flag answer, its OFREP object) as `kind` may see it."""
    name = result.feature["name"]
    code = result.reason.split(";", 1)[0].strip()
    if code == "ERROR":  # e.g. a $.flags dependency cycle: the engine could not evaluate it
        return 400, {"key": name, "errorCode": "GENERAL", "errorDetails": f"flag evaluation failed: {result.reason}"}
    metadata: dict[str, Any] = {"enabled": result.enabled, "featureId": result.feature["id"]}
    if result.value is not None:
        metadata["featureStateValue"] = result.value
    metadata["flagsmithReason"] = result.reason if kind is KeyKind.SERVER else public_reason(result.reason)
    variant = result.variant
    if variant is not None:
        metadata.update({"experiment.arm": variant, "experiment.active": result.enabled, "experiment.unit": "user"})
    if result.enabled:
        value, reason = one_value(result.value), REASONS.get(code, "UNKNOWN")
    else:
        value, reason = False, "DISABLED"
    # `variant` is always sent (the Python OFREP provider reads it unconditionally); without a multivariate
    # pick it names the Flagsmith state.
    if variant is None:
        variant = "enabled" if result.enabled else "disabled"
    return 200, {"key": name, "value": value, "reason": reason, "variant": variant, "metadata": metadata}


def public_reason(reason: str) -> str:
    """The engine's reason without the segment's name (`TARGETING_MATCH; segment=beta_testers` →
    `TARGETING_MATCH`): segment names are internal, and /api/v1/ never shows them to client keys."""
    return "TARGETING_MATCH" if reason.startswith("TARGETING_MATCH;") else reason


def one_value(value: Any) -> Any:
    """An enabled flag's OFREP value from its feature_state_value."""
    if value is None or value == "" or isinstance(value, bool):
        return True
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


@dataclass(frozen=True, slots=True)
class Evaluation(Body):
    """One context's encoded answers: `plain`/`gzip` is the bulk body; `single` each flag's answer."""

    single: dict[str, tuple[int, bytes]]
    identified: bool  # evaluated for an identity (usage counts it as one), not the environment
    held: int  # bytes `single` holds (and the tag's), counted once when encoded
    # the bulk answer's ETag, computed on first use (a single-flag answer never needs it): one cell, shared
    # by the gzip-upgraded copy
    tag: list[bytes] = field(default_factory=list, compare=False, repr=False)

    @property
    def etag(self) -> bytes:
        """A hash of the bulk body: every worker (and a restarted proxy) gives the same context the same tag."""
        tag = self.tag
        if not tag:
            tag.append(b'"' + hashlib.blake2b(self.plain, digest_size=12).hexdigest().encode() + b'"')
        return tag[0]

    def size(self) -> int:
        return Body.size(self) + self.held


# Per key kind (client keys are not told segment names): id(result) → (the result, its flag's name, its
# single-flag answer (HTTP status, body), the bytes that answer holds). Most results are the compiled
# evaluator's, built once per state and shared by every identity that lands on them, so each is encoded once,
# not per request. Holding the result keeps its id from being reused; the bound keeps one-off results
# (flag-engine's) and dropped states' from accumulating.
Encoded = tuple[FlagResult, str, tuple[int, bytes], int]
_ENCODED: tuple[dict[int, Encoded], ...] = ({}, {})
MAX_ENCODED = 20_000


def encoded_entry(result: FlagResult, kind: KeyKind) -> Encoded:
    """One result's single-flag answer as `kind` may see it, encoded (or found encoded)."""
    encoded = _ENCODED[kind]
    found = encoded.get(id(result))
    if found is not None and found[0] is result:
        return found
    status, entry = flag_entry(result, kind)
    # A copy: orjson's output keeps its 4 KB growth buffer (measured), 20 times what an answer needs.
    data = bytes(memoryview(orjson.dumps(entry)))
    if len(encoded) >= MAX_ENCODED:
        encoded.clear()
    found = encoded[id(result)] = (result, result.feature["name"], (status, data), len(data) + SINGLE_OVERHEAD)
    return found


def encode_evaluation(results: list[FlagResult], kind: KeyKind, identified: bool = True) -> Evaluation:
    encoded = _ENCODED[kind]
    single: dict[str, tuple[int, bytes]] = {}
    held = ETAG_BYTES
    for result in results:
        found = encoded.get(id(result))
        if found is None or found[0] is not result:
            found = encoded_entry(result, kind)
        single[found[1]] = found[2]
        held += found[3]
    plain = b'{"flags":[' + b",".join([answer[1] for answer in single.values()]) + b"]}"
    return Evaluation(plain, None, single, identified, held)


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    for candidate in if_none_match.split(b","):
        candidate = candidate.strip()
        if candidate == b"*" or candidate.removeprefix(b"W/") == etag:
            return True
    return False


# -- routes --------------------------------------------------------------------------------------


class Context(Parsed):
    """An OFREP context: keyed like identity answers but with traits sorted (a context is a map), and
    tagged so these stay apart from /api/v1/identities/ bodies."""

    __slots__ = ("traits",)

    def __init__(self, kind: KeyKind, identifier: str | None, traits: dict[str, Any], size: int) -> None:
        self.identifier = identifier
        self.traits = traits
        # names are unique, so only names are compared
        self.key: Hashable = ("ofrep", kind, identifier, traits_key(sorted(traits.items(), key=itemgetter(0))))
        self.key_bytes = key_cost(size, len(traits))

    def encode(self, state: Served, kind: KeyKind) -> Body:
        try:
            results = state.identity_results(kind, self.identifier, self.traits)
        except RequestInvalid as error:  # a trait value flag-engine cannot evaluate
            raise _invalid(str(error.errors[0]["msg"])) from None
        return encode_evaluation(results, kind, self.identifier is not None)


def parse(kind: KeyKind, raw: bytes, call: Call) -> Parsed:
    identifier, traits = parse_context(raw)
    return Context(kind, identifier, traits, len(raw))


class OfrepRoutes:
    """The two OFREP handlers, on the shared identity pipeline (proxy/http/identities.py)."""

    def __init__(self, identities: IdentityPipeline) -> None:
        self.identities = identities

    async def flag(self, call: Call) -> Reply:
        key = call.route_value
        state, evaluation = await self._evaluate(call, False, key)
        found = evaluation.single.get(key)
        if found is None:  # unknown, or hidden from this key (server-only, or disabled with hide_disabled_flags)
            raise OfrepError(404, "FLAG_NOT_FOUND", f"flag '{key}' was not found", key)
        self.identities.count(state, "identities" if evaluation.identified else "flags")
        return Reply(found[0], [], found[1])

    async def flags(self, call: Call) -> Reply:
        accept = call.header(b"accept-encoding")
        state, evaluation = await self._evaluate(call, accepts_gzip(accept), None)
        headers: Headers = [(b"etag", evaluation.etag)]
        if_none_match = call.header(b"if-none-match")
        if if_none_match is not None and etag_matches(if_none_match, evaluation.etag):
            return Reply(304, headers, None)
        data = negotiated(accept, evaluation, headers)
        self.identities.count(state, "identities" if evaluation.identified else "flags")
        return Reply(200, headers, data)

    async def _evaluate(self, call: Call, gzip_wanted: bool, flag: str | None) -> tuple[Served, Evaluation]:
        try:
            state, body = await self.identities.post(call, request_key(call), "ofrep", parse, gzip_wanted)
        except OfrepError as error:
            error.key = flag
            raise
        except PayloadTooLarge as error:
            raise OfrepError(400, "INVALID_CONTEXT", f"context too large: {error.message}", flag) from None
        except ProxyError as error:
            raise OfrepError(error.status, "GENERAL", error.message, flag) from None
        assert isinstance(body, Evaluation)  # the "ofrep" tag keeps other bodies out of these keys
        return state, body
