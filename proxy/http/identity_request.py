"""Validation of identity requests, with 422 bodies shaped like the Python proxy's (FastAPI/pydantic).

Beyond the Python proxy's rules, sizes are bounded so one request cannot pin megabytes in the identity
cache: an identifier of at most MAX_IDENTIFIER characters and at most MAX_TRAITS traits (Flagsmith's
public limits cap trait values at 2,000 bytes but name no trait count; 1,000 is far above what SDKs send).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import orjson

from proxy.http.errors import RequestInvalid

MAX_TRAIT_STRING = 2000
MAX_IDENTIFIER = 2000
MAX_TRAITS = 1000

__all__ = ["RequestInvalid", "parse_identity_body", "parse_identity_query", "query_param"]


def _error(kind: str, loc: list[Any], msg: str, value: Any, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    error = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx:
        error["ctx"] = ctx
    return error


Identity = tuple[str, list[dict[str, Any]], dict[str, Any]]


def is_json_content_type(content_type: bytes | None) -> bool:
    """Missing, `application/json` or `application/*+json` (parameters ignored), as the Python proxy."""
    if not content_type or content_type == b"application/json":
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def parse_identity_body(raw: bytes, content_type: bytes | None) -> Identity:
    """Body → (identifier, traits as echoed, traits for evaluation). Raises RequestInvalid.

    One pass over a valid body; the first thing out of the ordinary sends it to `_validated`, which
    walks it again collecting every error, as pydantic reports them."""
    if not is_json_content_type(content_type):
        text = raw.decode("utf-8", "replace")
        raise RequestInvalid(
            [
                _error(
                    "model_attributes_type",
                    ["body"],
                    "Input should be a valid dictionary or object to extract fields from",
                    text,
                )
            ]
        )
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestInvalid(
            [_error("json_invalid", ["body", exc.pos], "JSON decode error", {}, {"error": exc.msg})]
        ) from None
    if type(data) is dict:
        identifier = data.get("identifier")
        traits = data.get("traits", [])
        if (
            type(identifier) is str
            and len(identifier) <= MAX_IDENTIFIER
            and type(traits) is list
            and len(traits) <= MAX_TRAITS
        ):
            echo: list[dict[str, Any]] = []
            evaluated: dict[str, Any] = {}
            for trait in traits:
                if type(trait) is not dict:
                    break
                key = trait.get("trait_key")
                value = trait.get("trait_value")
                if type(key) is not str:
                    break
                if type(value) is str:
                    if len(value) > MAX_TRAIT_STRING:
                        break
                elif type(value) is list or type(value) is dict:
                    break
                echo.append({"trait_key": key, "trait_value": value})
                evaluated[key] = value
            else:
                return identifier, echo, evaluated
    return _validated(data)


def _validated(data: Any) -> Identity:
    """Every error in a parsed body (it has at least one, or the caller found none and it returns)."""
    if not isinstance(data, dict):
        raise RequestInvalid(
            [
                _error(
                    "model_attributes_type",
                    ["body"],
                    "Input should be a valid dictionary or object to extract fields from",
                    data,
                )
            ]
        )
    errors: list[dict[str, Any]] = []
    raw_identifier = data.get("identifier")
    identifier = raw_identifier if isinstance(raw_identifier, str) else ""
    if "identifier" not in data:
        errors.append(_error("missing", ["body", "identifier"], "Field required", data))
    elif not isinstance(raw_identifier, str):
        errors.append(_error("string_type", ["body", "identifier"], "Input should be a valid string", raw_identifier))
    else:
        _check_identifier(identifier, ["body", "identifier"], errors)
    traits = data.get("traits", [])
    echo: list[dict[str, Any]] = []
    if traits is None or not isinstance(traits, list):
        errors.append(_error("list_type", ["body", "traits"], "Input should be a valid list", traits))
    elif len(traits) > MAX_TRAITS:
        errors.append(
            _error(
                "too_long",
                ["body", "traits"],
                f"List should have at most {MAX_TRAITS} items after validation, not {len(traits)}",
                f"<{len(traits)} traits>",
                {"field_type": "List", "max_length": MAX_TRAITS, "actual_length": len(traits)},
            )
        )
    else:
        for index, trait in enumerate(traits):
            checked = _check_trait(trait, ["body", "traits", index], errors)
            if checked is not None:
                echo.append(checked)
    if errors:
        raise RequestInvalid(errors)
    return identifier, echo, {t["trait_key"]: t["trait_value"] for t in echo}


def _check_identifier(identifier: str, loc: list[Any], errors: list[dict[str, Any]]) -> None:
    if len(identifier) > MAX_IDENTIFIER:
        errors.append(
            _error(
                "string_too_long",
                loc,
                f"String should have at most {MAX_IDENTIFIER} characters",
                identifier[:100] + "…",
                {"max_length": MAX_IDENTIFIER, "actual_length": len(identifier)},
            )
        )


def _check_trait(trait: Any, loc: list[Any], errors: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not isinstance(trait, dict):
        errors.append(
            _error(
                "model_attributes_type",
                loc,
                "Input should be a valid dictionary or object to extract fields from",
                trait,
            )
        )
        return None
    ok = True
    key = trait.get("trait_key")
    if "trait_key" not in trait:
        errors.append(_error("missing", [*loc, "trait_key"], "Field required", trait))
        ok = False
    elif not isinstance(key, str):
        errors.append(_error("string_type", [*loc, "trait_key"], "Input should be a valid string", key))
        ok = False
    value = trait.get("trait_value")
    value_loc = [*loc, "trait_value"]
    if isinstance(value, str):
        if len(value) > MAX_TRAIT_STRING:
            errors.append(
                _error(
                    "string_too_long",
                    value_loc,
                    f"String should have at most {MAX_TRAIT_STRING} characters",
                    value,
                    {"max_length": MAX_TRAIT_STRING, "actual_length": len(value)},
                )
            )
            ok = False
    elif isinstance(value, list | dict):
        # Not one of the union's members: one error per member, as pydantic reports.
        errors.extend(
            [
                _error("string_type", [*value_loc, "str"], "Input should be a valid string", value),
                _error("int_type", [*value_loc, "int"], "Input should be a valid integer", value),
                _error("float_type", [*value_loc, "float"], "Input should be a valid number", value),
                _error("bool_type", [*value_loc, "bool"], "Input should be a valid boolean", value),
            ]
        )
        ok = False
    return {"trait_key": key, "trait_value": value} if ok else None


def parse_identity_query(raw_query: bytes | None) -> str:
    """`identifier` from the query string (the last one wins, as in FastAPI). Raises RequestInvalid."""
    identifier = query_param(raw_query, "identifier")
    if identifier is None:
        raise RequestInvalid([_error("missing", ["query", "identifier"], "Field required", None)])
    errors: list[dict[str, Any]] = []
    _check_identifier(identifier, ["query", "identifier"], errors)
    if errors:
        raise RequestInvalid(errors)
    return identifier


def query_param(raw_query: bytes | None, name: str) -> str | None:
    if not raw_query:
        return None
    values = parse_qs(raw_query.decode("utf-8", "replace"), keep_blank_values=True).get(name)
    return values[-1] if values else None
