"""The identity responses' cache key (also OFREP's): what evaluation tells apart, the key tells apart."""

from __future__ import annotations

from typing import Any

from proxy.http.identities import traits_key


def test_traits_key_tells_apart_what_evaluation_tells_apart() -> None:
    values: list[Any] = [0.0, -0.0, 0, False, "0", "-0", 1, 1.0, True, "1", 2**53, float(2**53), None, ""]
    keys = {traits_key([("t", value)]) for value in values}
    assert len(keys) == len(values)
    assert traits_key([("t", float("nan"))]) == traits_key([("t", float("nan"))])  # one entry, not one per request
    assert traits_key([("a", 1), ("b", 2)]) != traits_key([("b", 2), ("a", 1)])  # the echo keeps the order
