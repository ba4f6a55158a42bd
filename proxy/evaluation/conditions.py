"""Segment conditions compiled once into predicates that agree with flag-engine 11 on every input.

A predicate reads one dict per evaluation, the identity's *facts*: each trait's value coerced the way
the engine coerces what it reads (`"42"` → 42, `"1.5"` → 1.5), plus the identity's own fields under
tuple keys (a trait name is a str, so it can never collide with them). Condition values are parsed and
cast here, once, for each trait type the engine distinguishes (bool, int, float, str, semver), so a call
is a dict lookup, a type test and one comparison.

Where the engine would raise for a condition value (an invalid regex, a MODULO divisor of 0, a
PERCENTAGE_SPLIT or IN value of the wrong type), or reads something this module does not reproduce
(`$.flags`, other JSONPath), compiling raises `Unsupported`, and the caller falls back to flag-engine.
Rules and the 25 pitfalls: ../shared/reference/engine-semantics.md, sections 3-5.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any, cast

import jsonpath_rfc9535
import semver
from flag_engine.segments.evaluator import MATCHERS_BY_OPERATOR
from flag_engine.utils.hashing import get_hashed_percentage_for_object_ids

from proxy.evaluation.safe_regex import compile_safe

try:  # CPython's built-in MD5 costs half of OpenSSL's through hashlib for these short inputs (same digest)
    from _md5 import md5  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - a build without it
    from hashlib import md5

Facts = dict[Any, Any]
Predicate = Callable[[Facts], bool]

# Facts keys for the identity's own fields (tuples: never equal to a trait name).
# The identity key, raw (uncoerced) and UTF-8 encoded: what a blank-property PERCENTAGE_SPLIT hashes.
IDENTITY_KEY = ("identity", "key")

# JSONPath properties compiled here (anything else under "$." falls back to flag-engine):
# the identity's identifier and key, the environment's key and name, and a trait by a plain name.
_FIELD_PATHS = {"$.identity.identifier", "$.identity.key", "$.environment.key", "$.environment.name"}
_TRAIT_PATH = re.compile(r"\$\.identity\.traits\.([A-Za-z_][A-Za-z0-9_]*)")
# Paths under these roots cannot reach `$.flags`, so one segment can use flag-engine on its own.
_SEGMENT_SAFE_ROOT = re.compile(r"\$\.(identity|environment|features|segments)([.\[]|$)")

_TYPED: dict[str, Callable[[Any, Any], bool]] = {
    "EQUAL": operator.eq,
    "NOT_EQUAL": operator.ne,
    "GREATER_THAN": operator.gt,
    "GREATER_THAN_INCLUSIVE": operator.ge,
    "LESS_THAN": operator.lt,
    "LESS_THAN_INCLUSIVE": operator.le,
    "CONTAINS": operator.contains,
}
KNOWN_OPERATORS = {*_TYPED, "NOT_CONTAINS", "REGEX", "MODULO", "IN", "PERCENTAGE_SPLIT", "IS_SET", "IS_NOT_SET"}


class Unsupported(Exception):
    """The compiled evaluator cannot reproduce flag-engine here.

    `scope` is "segment" when flag-engine can decide this one segment alone, "environment" when the whole
    environment must be evaluated by flag-engine (dependencies between flags, or conditions that raise).
    """

    def __init__(self, reason: str, scope: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.scope = scope
        self.detail = detail


class NeedsEngine(Exception):
    """This request's traits hold something the engine raises on or coerces unusually: ask flag-engine."""


# -- coercion (flag_engine.context.mappers.map_any_value_to_context_value) ---------------------------

_NUMBER_START = frozenset("-0123456789")
_FLOAT = re.compile(r"-?[0-9]+\.[0-9]+")
# Above this many digits an int can overflow float() in MODULO, and past 4,300 int() refuses it: the
# engine raises there, so such requests go to the engine rather than risk answering where it raises.
_MAX_INT_DIGITS = 300
_HUGE = 10**_MAX_INT_DIGITS


def coerce(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        # Only strings starting like a number can be one; most traits return here.
        if value[:1] not in _NUMBER_START:
            return value
        digits = value[1:] if value[0] == "-" else value
        if digits.isascii() and digits.isdigit():  # -?[0-9]+ without the regex
            if len(digits) > _MAX_INT_DIGITS:
                raise NeedsEngine("a numeric string too long for int()")
            return int(value)
        return float(value) if _FLOAT.fullmatch(value) else value
    if kind is bool or kind is float or value is None:
        return value
    if kind is int:
        if -_HUGE < value < _HUGE:
            return value
        raise NeedsEngine("an integer too large for float()")
    if kind is list or kind is dict:
        try:
            return str(value)  # what the engine does for a non-scalar read as a plain trait
        except ValueError:  # an int inside too long for str()
            raise NeedsEngine("a trait holding an integer too long for str()") from None
    raise NeedsEngine(f"a trait of type {kind.__name__}")


def is_scalar(value: Any) -> bool:
    """What the engine's JSONPath getter keeps (dicts and lists read as None)."""
    return value is None or isinstance(value, str | int | float | bool)


# -- hashing (flag_engine.utils.hashing) --------------------------------------------------------------


def hashed_percentage(joined_ids: bytes) -> float:
    """The engine's percentage for ids already joined with "," and encoded; the rare exact-100 case
    (the engine then hashes the ids repeated) is left to the engine's own function."""
    value = ((int.from_bytes(md5(joined_ids).digest()) % 9999) / 9998) * 100  # big-endian, as int(hex, 16)
    if value == 100:
        return get_hashed_percentage_for_object_ids([joined_ids.decode()], iterations=2)
    return value


# -- properties -----------------------------------------------------------------------------------


def fact_key(prop: Any, operator_name: str) -> Any:
    """The facts key a condition reads; raises Unsupported for properties only flag-engine can read."""
    if not isinstance(prop, str):
        raise Unsupported("invalid_property", "environment", f"property {prop!r} is not a string")
    if operator_name == "PERCENTAGE_SPLIT" and not prop:
        return IDENTITY_KEY
    if not prop.startswith("$."):
        return prop
    if not _is_jsonpath(prop):
        return prop  # not a JSONPath: the engine reads a trait of that literal name
    if prop in _FIELD_PATHS or _TRAIT_PATH.fullmatch(prop):
        return ("path", prop)
    scope = "segment" if _SEGMENT_SAFE_ROOT.match(prop) and not prop.startswith("$.flags") else "environment"
    reason = "flags_dependency" if prop.startswith(("$.flags", "$['flags']", '$["flags"]')) else "unsupported_path"
    raise Unsupported(reason, scope, f"property {prop!r}")


@lru_cache(maxsize=4096)
def _is_jsonpath(prop: str) -> bool:
    # Parsing a path costs ~80 µs (measured) and environments name the same few: remember the verdicts.
    try:
        jsonpath_rfc9535.compile(prop)
    except jsonpath_rfc9535.JSONPathSyntaxError:
        return False
    return True


def path_resolver(prop: str, environment: dict[str, Any]) -> Callable[[Facts, str, str, dict[str, Any]], Any]:
    """How a compiled JSONPath property is read: a trait literally named like the path comes first."""
    if prop == "$.identity.identifier":
        return lambda facts, identifier, key, traits: _shadowed(facts, prop, identifier)
    if prop == "$.identity.key":
        return lambda facts, identifier, key, traits: _shadowed(facts, prop, key)
    if prop in ("$.environment.key", "$.environment.name"):
        constant = environment[prop.rsplit(".", 1)[1]]
        return lambda facts, identifier, key, traits: _shadowed(facts, prop, constant)
    name = prop.rsplit(".", 1)[1]

    def trait(facts: Facts, identifier: str, key: str, traits: dict[str, Any]) -> Any:
        shadow = facts.get(prop)
        if shadow is not None:
            return shadow
        value = traits.get(name)
        return coerce(value) if is_scalar(value) else None

    return trait


def _shadowed(facts: Facts, prop: str, value: Any) -> Any:
    shadow = facts.get(prop)
    return shadow if shadow is not None else coerce(value)


# -- conditions -----------------------------------------------------------------------------------


def compile_condition(condition: dict[str, Any], segment_key: str) -> Predicate:
    operator_name = condition["operator"]
    # The property first: one only flag-engine can read decides the scope even with an unknown operator.
    key = fact_key(condition["property"], operator_name)
    if not isinstance(operator_name, str) or operator_name not in KNOWN_OPERATORS:
        scope = "segment" if isinstance(operator_name, str) else "environment"
        raise Unsupported("unknown_operator", scope, f"operator {operator_name!r}")
    value = condition["value"]
    if operator_name in _TYPED:
        return _typed(_TYPED[operator_name], operator_name, key, value)
    return _COMPILERS[operator_name](key, value, segment_key)


def _is_set(key: Any, value: Any, segment_key: str) -> Predicate:
    return lambda facts: facts.get(key) is not None


def _is_not_set(key: Any, value: Any, segment_key: str) -> Predicate:
    return lambda facts: facts.get(key) is None


def in_values(value: Any) -> frozenset[str]:
    """The engine's IN set: a list, a JSON array string, or comma-separated (no trimming)."""
    if isinstance(value, list):
        return frozenset(v if type(v) is str else str(v) for v in value)
    if not isinstance(value, str):
        raise Unsupported("raises", "environment", f"IN value {value!r} is neither a string nor a list")
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            return frozenset(value.split(","))
        return frozenset(v if type(v) is str else str(v) for v in parsed)
    return frozenset(value.split(","))


def _in(key: Any, value: Any, segment_key: str) -> Predicate:
    values = in_values(value)

    def check(facts: Facts) -> bool:
        found = facts.get(key)
        # Only an exact int is compared as its string (bools and floats never match).
        return (str(found) if type(found) is int else found) in values

    return check


def _percentage_split(key: Any, value: Any, segment_key: str) -> Predicate:
    try:
        threshold = float(value)
    except ValueError:
        return lambda facts: False
    except TypeError:
        raise Unsupported("raises", "environment", f"PERCENTAGE_SPLIT value {value!r}") from None
    prefix = f"{segment_key},"
    if key is IDENTITY_KEY:  # already encoded
        encoded_prefix = prefix.encode()
        return lambda facts: hashed_percentage(encoded_prefix + facts[IDENTITY_KEY]) <= threshold

    def check(facts: Facts) -> bool:
        found = facts.get(key)
        return found is not None and hashed_percentage((prefix + str(found)).encode()) <= threshold

    return check


def _not_contains(key: Any, value: Any, segment_key: str) -> Predicate:
    text = str(value)

    def check(facts: Facts) -> bool:
        found = facts.get(key)
        return isinstance(found, str) and text not in found

    return check


def _regex(key: Any, value: Any, segment_key: str) -> Predicate:
    try:
        matches = compile_safe(str(value)).matches  # never `re` on a client's text: safe_regex.py
    except re.error as exc:
        raise Unsupported("raises", "environment", f"REGEX {value!r}: {exc}") from None

    def check(facts: Facts) -> bool:
        found = facts.get(key)
        return found is not None and matches(str(found))

    return check


def _modulo(key: Any, value: Any, segment_key: str) -> Predicate:
    if not value:
        return lambda facts: False
    if not isinstance(value, str):
        raise Unsupported("raises", "environment", f"MODULO value {value!r} is not a string")
    try:
        divisor_text, remainder_text = value.split("|")
        divisor, remainder = float(divisor_text), float(remainder_text)
    except ValueError:
        return lambda facts: False
    if divisor == 0:
        raise Unsupported("raises", "environment", f"MODULO {value!r} divides by zero")

    def check(facts: Facts) -> bool:
        found = facts.get(key)
        return isinstance(found, int | float) and found % divisor == remainder

    return check


_COMPILERS: dict[str, Callable[[Any, Any, str], Predicate]] = {
    "IS_SET": _is_set,
    "IS_NOT_SET": _is_not_set,
    "IN": _in,
    "PERCENTAGE_SPLIT": _percentage_split,
    "NOT_CONTAINS": _not_contains,
    "REGEX": _regex,
    "MODULO": _modulo,
}


# -- typed comparisons (EQUAL ... CONTAINS): the engine casts the condition value to the trait's type --

_NEVER = object()  # a cast that fails: the engine suppresses the error and answers False


def _cast(cast: Callable[[str], Any], value: str) -> Any:
    try:
        return cast(value)
    except (TypeError, ValueError):
        return _NEVER


def _compare(op: Callable[[Any, Any], bool], left: Any, right: Any) -> bool:
    if right is _NEVER:
        return False
    try:
        return op(left, right)
    except (TypeError, ValueError):
        return False


def _typed(op: Callable[[Any, Any], bool], operator_name: str, key: Any, value: Any) -> Predicate:
    if not isinstance(value, str):
        return _typed_by_engine(operator_name, key, value)
    as_int = _cast(int, value)
    as_float = _cast(float, value)
    as_bool = value not in ("False", "false")
    if_true, if_false = _compare(op, True, as_bool), _compare(op, False, as_bool)
    string_check = _semver_check(op, value) if value[-7:] == ":semver" else _string_check(op, value)
    numbers_contain = op is not operator.contains  # `in` on a number raises TypeError: False

    def check(facts: Facts) -> bool:
        found: Any = facts.get(key)
        kind: type = type(found)  # type() rather than isinstance: bool is not an int here, and it is faster
        if kind is str:
            return string_check(found)
        if kind is bool:
            return if_true if found else if_false
        if kind is int:
            return numbers_contain and as_int is not _NEVER and op(found, as_int)
        if kind is float:
            return numbers_contain and as_float is not _NEVER and op(found, as_float)
        return False  # None (missing); coercion yields no other type

    return check


def _string_check(op: Callable[[Any, Any], bool], value: str) -> Callable[[str], bool]:
    return lambda found: op(found, value)


def _semver_check(op: Callable[[Any, Any], bool], value: str) -> Callable[[str], bool]:
    text = value[:-7]
    # Comparing a Version with a string parses the string each time; parse it once (same result, and
    # no DeprecationWarning for == on strings). CONTAINS tests membership in the version's parts.
    right: Any = text if op is operator.contains else _cast(semver.Version.parse, text)
    parse = semver.Version.parse

    def check(found: str) -> bool:
        if right is _NEVER:
            return False
        try:
            return op(parse(found), right)
        except (TypeError, ValueError):
            return False

    return check


def _typed_by_engine(operator_name: str, key: Any, value: Any) -> Predicate:
    """A non-string condition value (unusual): the engine's own matcher decides, exactly."""
    matcher = MATCHERS_BY_OPERATOR[cast(Any, operator_name)]

    def check(facts: Facts) -> bool:
        found = facts.get(key)
        return found is not None and matcher(value, found)

    return check
