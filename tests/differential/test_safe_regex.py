"""REGEX conditions: the safe matcher against Python's `re` (flag-engine's), and catastrophic patterns that
used to freeze a worker for minutes (`^(a+)+$` against 36 `a`s and a `!`); through a real proxy:
tests/system/test_regex_conditions.py."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import pytest
from flag_engine.engine import get_evaluation_result
from flag_engine.segments.evaluator import MATCHERS_BY_OPERATOR
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.evaluation import engine, safe_regex
from proxy.evaluation.safe_regex import DEADLINE_SECONDS, MAX_TEXT, SafeRegex, compile_safe, engine_regex

CATASTROPHIC_TEXT = "a" * 36 + "!"

# Patterns RE2 must run (and agree with `re` on): classes, alternation, anchors, repeats, Unicode, flags.
ORDINARY = [
    *[r"^p.*", r"\d+", r"[A-Z]{2}", r"(?i)PREM", "b", r".*@example\.com$", r"^1\.50$", r"ab$", "True", ""],
    *[r"^[\w.+-]+@[\w-]+\.[\w.]+$", r"(?i)^[a-z0-9._%+-]+@example\.com$", r"^(free|premium|enterprise)$"],
    *[r"^[^\s@]+@[^\s@]+$", r"[[:alpha:]]", r"a{,3}b", r"x*?y", r"(?s).x", r"(?m)^b$", r"\A\Z", r"^$"],
    *[r"[^\d\s]+", r"(?i)straße", r"(?i)[k]", r"(?i)ſ", r"(?i)[a-z]+$", r"(?i)[^a-z]", r"é|e\u0301", r"^\s+$"],
    *[r"(?a)\w+$", r"(?i)(?a)k", r"(?a)\s", r"\bfoo\b", r"(?x) a b # a comment", r"[\s\S]", r"\W", r"\D+"],
    *[r"(?i:AB)c", r"(?i)σ", r"(?i)[α-ω]+", r"[\u0600-\u06ff]+", r"\u00e9", r"😀", r"(?i)ǅ", r"(a|ab)(c|bcd)d"],
    *[r"(?m)a\n^\Z", r"(?m)a$\n^$", r"(?m)^$", r"a\Z", r"(?s)a.$", r"a$\n", r"[\\\]\-^]+", r"\x00|\t"],
    *[r"^(a+)+$", r"(x+x+)+y", r"^(([a-z])+.)+[A-Z]([a-z])+$", r"(?i)^(\w+\s?)*$", r".{3,5}$", r"a{2}b{0,2}"],
]
# Texts that tell the semantics apart: case folds (K Kelvin, ſ, İ, ı, ß, σ/ς), Unicode digits and spaces,
# combining marks, a final newline, C0 separators Python counts as spaces.
TEXTS = [
    *["", "a", "ab", "ab\n", "abc", "b", "a\nb", "x\ny", "aab", "aa", "premium", "Premium", "PREM", "free\n"],
    *["42", "١٢٣", "GB", "x@example.com", "X@EXAMPLE.COM", "a.b+c@d-e.fr", "foo bar", "foo", "foo é", "K", "k"],
    *["\u212a", "ſ", "S", "s", "STRASSE", "Straße", "İ", "ı", "I", "i", "é", "e\u0301", "ü_1", "\u00a0x", " \t"],
    *["\x0b", "\x1c", "\u2028", "ΣΑΣ", "σς", "αβγ", "ǅ", "ǆ", "Ǆ", "😀", "مرحبا", "xxxxy", "abcdd", "Aaaa Bbb"],
    *["aaaa", "abbb", "\r\n", "a" * 20, "a" * 20 + "!", "a\n\n", "\n", "\\]-^", "\x00", "\t"],
]
RE_ONLY = [
    r"(a)\1",
    r"(?<=a)b",
    r"(?=ab)a",
    r"(?!x)\w+",
    r"a++b",
    r"(?>a+)b",
    r"(?P<q>['\"]).*(?P=q)",
    r"(a)?(?(1)b|c)",
]
CATASTROPHIC = [r"^(a+)+$", r"^(a|a)+$", r"^(a|aa)+$", r"^([a-zA-Z0-9]+([._-]?[a-zA-Z0-9]+)*)@x\.com$", r"(x+x+)+y"]


def python_match(pattern: str, text: str) -> bool:
    return re.compile(pattern).match(text) is not None  # flag-engine's REGEX


@pytest.mark.parametrize("pattern", ORDINARY)
def test_ordinary_patterns_run_on_re2_and_agree_with_re(pattern: str) -> None:
    compiled = compile_safe(pattern)
    assert compiled.linear, pattern
    catastrophic_for_re = pattern in CATASTROPHIC or "+)+" in pattern or ")*$" in pattern
    for text in TEXTS:
        if catastrophic_for_re and len(text) > 12:
            continue  # `re` itself would take too long: the point of this module
        assert compiled.matches(text) == python_match(pattern, text), (pattern, text)


unicode_texts = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("aAbBkKsSiIfoxyz019_.@-+ \n\t\x0b\x1c\u212aſİıßσςΣé\u0301١\u00a0😀ǅ")),
        st.characters(codec="utf-8"),
    ),
    max_size=10,
)


@settings(max_examples=300, deadline=None)
@given(pattern=st.sampled_from([p for p in ORDINARY if p not in CATASTROPHIC]), text=unicode_texts)
def test_generated_texts_agree_with_re(pattern: str, text: str) -> None:
    assert compile_safe(pattern).matches(text) == python_match(pattern, text), (pattern, text)


@pytest.mark.parametrize("pattern", RE_ONLY)
def test_patterns_re2_cannot_express_take_the_bounded_path_and_agree_with_re(pattern: str) -> None:
    compiled = compile_safe(pattern)
    assert not compiled.linear
    for text in [*TEXTS, "ab", "'q'", "\"q'", "bc", "c"]:
        assert compiled.matches(text) == python_match(pattern, text), (pattern, text)


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        (r"ab$", "ab\n"),  # Python's `$` also matches before a final newline; RE2's does not
        (r"free$", "free\n"),
        (r"\bfoo\b", "foo é"),  # Python's \b is Unicode, RE2's ASCII
        (r"\bé\b", "é"),
        (r"x\B", "xé"),
        (r"a", "a\ud800"),  # a lone surrogate is not UTF-8: RE2 cannot read it
    ],
)
def test_texts_re2_would_read_differently_take_the_bounded_path(pattern: str, text: str) -> None:
    assert compile_safe(pattern).linear
    assert compile_safe(pattern).matches(text) == python_match(pattern, text)


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_patterns_answer_in_linear_time(pattern: str) -> None:
    compiled = compile_safe(pattern)
    assert compiled.linear
    for text in (CATASTROPHIC_TEXT, "a" * 2000 + "!", "x" * 2000):
        started = time.perf_counter()
        assert not compiled.matches(text)
        assert time.perf_counter() - started < 0.05


def test_a_match_past_its_deadline_is_no_match_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    compiled = SafeRegex(r"^(?=a)(a|aa)+$")  # a lookahead: not for RE2; catastrophic for backtracking
    assert not compiled.linear
    assert compiled.matches("aaaa")  # an ordinary text still matches
    before = safe_regex.timeouts[0]
    with caplog.at_level(logging.WARNING, "proxy.evaluator"):
        for _ in range(3):
            started = time.perf_counter()
            assert not compiled.matches("a" * 60 + "!")
            assert time.perf_counter() - started < DEADLINE_SECONDS + 0.5  # the regex package overshoots a little
    assert safe_regex.timeouts[0] == before + 3
    logged = [r.getMessage() for r in caplog.records if "ran out" in r.getMessage()]
    assert logged == ["REGEX '^(?=a)(a|aa)+$': a match ran out of its 20 ms: no match"]


def test_a_text_longer_than_the_cap_never_matches() -> None:
    assert compile_safe("a").matches("a" * MAX_TEXT)
    assert not compile_safe("a").matches("a" * (MAX_TEXT + 1))
    assert not compile_safe(r"(?=a)a").matches("a" * (MAX_TEXT + 1))


def test_invalid_patterns_raise_as_in_flag_engine() -> None:
    for pattern in ("[", "(?<", "a{2,1}", r"\p{L}"):
        with pytest.raises(re.error):
            re.compile(pattern)
        with pytest.raises(re.error):
            compile_safe(pattern)


@pytest.mark.parametrize(
    "node", [r"[a-z]", "k", "s", "i", "I", "ß", "σ", "µ", "ǅ", r"[^a]", r"[\w]", r"[\d\s]", r"[À-ÿ]", r"[^Ω-ω]", "."]
)
def test_ignorecase_sets_equal_a_scan_of_every_code_point(node: str) -> None:
    """`_ignorecase_set` asks `re` about the cased code points only: the full answer must be the same."""
    everything = safe_regex._all_code_points()
    for flags in (re.IGNORECASE, re.IGNORECASE | re.ASCII):
        found = re.compile(f"(?:{node})+", flags).finditer(everything)
        full = safe_regex._normalize((m.start(), m.end() - 1) for m in found)
        parsed = list(safe_regex.sre_parse.parse(node, flags))
        assert len(parsed) == 1
        op, value = parsed[0]
        assert safe_regex._char_set(op, value, flags) == full, (node, flags)


def regex_context(condition: dict[str, Any], traits: dict[str, Any]) -> dict[str, Any]:
    return {
        "environment": {"key": "env", "name": "env"},
        "features": {"f": {"key": "1", "name": "f", "enabled": False, "value": None, "metadata": {"id": 1}}},
        "segments": {
            "1": {
                "key": "1",
                "name": "regex",
                "rules": [{"type": "ALL", "conditions": [condition], "rules": []}],
                "overrides": [{"key": "2", "name": "f", "enabled": True, "value": "on", "metadata": {"id": 1}}],
            }
        },
        "identity": {"identifier": "someone", "traits": traits},
    }


def test_flag_engine_evaluates_regex_with_the_safe_matcher() -> None:
    """Every fallback to flag-engine (environment, segment, request) goes through its operator table, which
    the module that calls the engine (proxy/evaluation/engine.py) sets on import."""
    assert engine.get_evaluation_result is get_evaluation_result
    assert MATCHERS_BY_OPERATOR["REGEX"] is engine_regex
    condition = {"property": "email", "operator": "REGEX", "value": r"^(a+)+$"}
    started = time.perf_counter()
    result = get_evaluation_result(regex_context(condition, {"email": CATASTROPHIC_TEXT}))
    assert time.perf_counter() - started < 0.5
    assert result["flags"]["f"]["enabled"] is False
    assert get_evaluation_result(regex_context(condition, {"email": "aaa"}))["flags"]["f"]["enabled"] is True
    # The engine's own reading of values is kept: coerced, then str() ("1.50" is 1.5, True is "True").
    for value, pattern, expected in [("1.50", r"^1\.5$", True), (True, "True", True), ("007", "^7$", True)]:
        condition = {"property": "t", "operator": "REGEX", "value": pattern}
        got = get_evaluation_result(regex_context(condition, {"t": value}))
        assert got["flags"]["f"]["enabled"] is expected
    with pytest.raises(re.error):  # an invalid pattern still raises out of the engine, as before
        get_evaluation_result(regex_context({"property": "t", "operator": "REGEX", "value": "["}, {"t": "x"}))
