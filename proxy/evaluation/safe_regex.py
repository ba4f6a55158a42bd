"""REGEX conditions without catastrophic backtracking: RE2 where it means what Python's `re` means.

flag-engine runs `re.compile(pattern).match(str(value))` on the caller's thread: a pattern such as
`^(a+)+$` against 36 `a`s and a `!` takes minutes, and the whole worker with it, for a value any holder of
a public client key can send. Here a pattern is parsed once by Python's own parser (so what `re` rejects
still raises `re.error`, as the engine does) and its tree is written out as an RE2 pattern that matches
exactly the same strings:

* every one-character node (a literal, a class, `\\d`, `\\w`, `\\s`, `.`) becomes an explicit RE2 class of
  the code points *Python's `re`* matches with it: categories and case-insensitive sets are found by running
  `re` itself over the code points, never by trusting RE2's Unicode tables or case folding;
* groups become non-capturing, repeats keep their bounds (greedy or lazy: a match exists either way);
* `$` without MULTILINE also matches before a final newline in Python and not in RE2, and Unicode `\\b`
  differs from RE2's ASCII one: such a pattern uses RE2 only when the text cannot tell (no final
  newline; an ASCII text).

What RE2 cannot express (backreferences, lookarounds, conditionals, atomic groups, possessive repeats,
counts above 1,000, programs above RE2's memory budget), and texts the conditions above exclude, go to
the bounded path: the `regex` package with a deadline (`DEADLINE_SECONDS`). A match that runs out of time
answers "no match", is counted (`edge_proxy_regex_timeouts_total`) and logged once per pattern. A text longer
than `MAX_TEXT` characters never matches. README "Regex conditions" lists what differs from flag-engine.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable
from functools import lru_cache
from re import _constants as sre  # type: ignore[attr-defined]  # the parse tree's opcodes
from re import _parser as sre_parse  # type: ignore[attr-defined]  # Python's own pattern parser
from typing import Any

import re2  # type: ignore[import-untyped]
import regex  # type: ignore[import-untyped]
from flag_engine.segments import evaluator as engine_evaluator
from re2 import _re2  # the compiled object: 2.4 µs a match, where re2.match's wrapper costs 12 µs

log = logging.getLogger("proxy.evaluator")

# Matches stopped at their deadline in this process: a plain integer, as the request counters (a flood of
# timed-out matches costs no multiprocess write each); proxy/worker/counters.py flushes it to Prometheus.
timeouts = [0]

MAX_TEXT = 4096  # characters; a longer value never matches (trait strings are capped at 2,000 anyway)
DEADLINE_SECONDS = 0.02  # the bounded path's budget per match; measured overshoot of regex's timeout: < 10 ms

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code point ranges

_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = ((0xD800, 0xDFFF),)  # never in an encodable text; RE2 refuses them in classes
_RE2_MAX_COUNT = 1000
_IGNORECASE, _DOTALL, _MULTILINE, _ASCII = re.IGNORECASE, re.DOTALL, re.MULTILINE, re.ASCII
_ANCHOR_START = _re2.RE2.Anchor.ANCHOR_START
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a pattern RE2 refuses is expected here, not an error to print
_RE2_OPTIONS.never_capture = True


class _Inexpressible(Exception):
    """This part of the pattern has no RE2 equivalent: the whole pattern takes the bounded path."""


# -- ranges ---------------------------------------------------------------------------------------


def _normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return tuple(merged)


def _complement(ranges: Ranges) -> Ranges:
    result, start = [], 0
    for low, high in ranges:
        if low > start:
            result.append((start, low - 1))
        start = high + 1
    if start <= _MAX_CODE_POINT:
        result.append((start, _MAX_CODE_POINT))
    return tuple(result)


def _difference(ranges: Ranges, removed: Ranges) -> Ranges:
    return _complement(_normalize(_complement(ranges) + removed))


@lru_cache(maxsize=1)
def _all_code_points() -> str:
    """Every code point once, in order (surrogates included): what Python's `re` is asked about."""
    count = _MAX_CODE_POINT + 1
    data = bytearray(4 * count)
    data[0::4] = bytes(range(256)) * (count // 256)
    data[1::4] = b"".join(bytes([value]) * 256 for value in range(256)) * (count // 65536)
    data[2::4] = b"".join(bytes([value]) * 65536 for value in range(count // 65536))
    return data.decode("utf-32-le", "surrogatepass")  # 80 ms, once per process (join of chr(): 280 ms)


@lru_cache(maxsize=1)
def _cased() -> str:
    """The code points any case mapping touches: outside them, case-insensitivity changes nothing."""
    everything, found = _all_code_points(), list[str]()
    for start in range(0, len(everything), 256):
        block = everything[start : start + 256]
        if block.lower() == block and block.upper() == block and block.casefold() == block:
            continue  # most blocks: one test instead of 256
        found.extend(ch for ch in block if ch.lower() != ch or ch.upper() != ch or ch.casefold() != ch)
    return "".join(found)


@lru_cache(maxsize=64)
def _category(source: str, flags: int) -> Ranges:
    """What `\\d`, `\\w`, `\\s` (or a negation) match for Python, over every code point (~40 ms, once)."""
    everything = _all_code_points()
    found = re.compile(f"[{source}]+", flags).finditer(everything)
    return _normalize((m.start(), m.end() - 1) for m in found)


@lru_cache(maxsize=4096)
def _ignorecase_set(source: str, flags: int, sensitive: Ranges) -> Ranges:
    """A one-character node under IGNORECASE, as Python's `re` matches it: `re` decides for each cased code
    point; the others match as without IGNORECASE (tests/differential/test_safe_regex.py checks it by a full scan)."""
    cased = _cased()
    found = re.compile(f"{source}+", flags).finditer(cased)
    decided = ((ord(ch), ord(ch)) for m in found for ch in m.group())
    return _normalize(_difference(sensitive, _cased_ranges()) + tuple(decided))


@lru_cache(maxsize=1)
def _cased_ranges() -> Ranges:
    return _normalize((ord(ch), ord(ch)) for ch in _cased())


# -- one-character nodes --------------------------------------------------------------------------

_CATEGORY_SOURCE = {
    sre.CATEGORY_DIGIT: r"\d",
    sre.CATEGORY_NOT_DIGIT: r"\D",
    sre.CATEGORY_WORD: r"\w",
    sre.CATEGORY_NOT_WORD: r"\W",
    sre.CATEGORY_SPACE: r"\s",
    sre.CATEGORY_NOT_SPACE: r"\S",
}


def _class_item(op: Any, value: Any, flags: int) -> tuple[str, Ranges]:
    """One member of a character class: its Python source and the code points it matches (case-sensitive)."""
    if op is sre.LITERAL:
        return f"\\U{value:08x}", ((value, value),)
    if op is sre.RANGE:
        low, high = value
        return f"\\U{low:08x}-\\U{high:08x}", ((low, high),)
    if op is sre.CATEGORY and value in _CATEGORY_SOURCE:
        source = _CATEGORY_SOURCE[value]
        return source, _category(source, flags & _ASCII)
    raise _Inexpressible(f"class member {op} {value}")


def _char_set(op: Any, value: Any, flags: int) -> Ranges:
    """The code points a one-character node matches, exactly as Python's `re` decides."""
    if op is sre.ANY:
        return ((0, _MAX_CODE_POINT),) if flags & _DOTALL else _complement(((10, 10),))
    if op is sre.LITERAL or op is sre.NOT_LITERAL:
        source, sensitive = f"\\U{value:08x}", _normalize(((value, value),))
        negate = op is sre.NOT_LITERAL
    elif op is sre.IN:
        negate = bool(value) and value[0][0] is sre.NEGATE
        members = value[1:] if negate else value
        items = [_class_item(item_op, item_value, flags) for item_op, item_value in members]
        source = "".join(item_source for item_source, _ in items)
        sensitive = _normalize(r for _, item_ranges in items for r in item_ranges)
    else:
        raise _Inexpressible(str(op))
    if flags & _IGNORECASE:
        positive = _ignorecase_set(f"[{source}]", flags & (_IGNORECASE | _ASCII), sensitive)
    else:
        positive = sensitive
    return _complement(positive) if negate else positive


@lru_cache(maxsize=4096)
def _class(ranges: Ranges) -> str:
    ranges = _difference(ranges, _SURROGATES)
    if not ranges:
        return r"[^\x00-\x{10ffff}]"  # matches nothing
    parts = [f"\\x{{{low:x}}}" if low == high else f"\\x{{{low:x}}}-\\x{{{high:x}}}" for low, high in ranges]
    return f"[{''.join(parts)}]"


# -- the pattern ----------------------------------------------------------------------------------


class _Translation:
    def __init__(self) -> None:
        self.final_newline_differs = False  # `$` without MULTILINE: Python also matches before a final "\n"
        self.needs_ascii_text = False  # Unicode `\b`/`\B`: RE2's is ASCII-only

    def sequence(self, items: Iterable[tuple[Any, Any]], flags: int) -> str:
        return "".join(self.node(op, value, flags) for op, value in items)

    def node(self, op: Any, value: Any, flags: int) -> str:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.IN, sre.ANY):
            return _class(_char_set(op, value, flags))
        if op is sre.SUBPATTERN:
            _group, add, remove, items = value
            return f"(?:{self.sequence(items, (flags | add) & ~remove)})"
        if op is sre.BRANCH:
            return "(?:" + "|".join(self.sequence(items, flags) for items in value[1]) + ")"
        if op is sre.MAX_REPEAT or op is sre.MIN_REPEAT:
            low, high, items = value
            if low > _RE2_MAX_COUNT or (high != sre.MAXREPEAT and high > _RE2_MAX_COUNT):
                raise _Inexpressible("a count above RE2's 1,000")
            bounds = f"{{{low},}}" if high == sre.MAXREPEAT else f"{{{low},{high}}}"
            return f"(?:{self.sequence(items, flags)}){bounds}{'?' if op is sre.MIN_REPEAT else ''}"
        if op is sre.AT:
            return self.at(value, flags)
        raise _Inexpressible(str(op))  # GROUPREF, ASSERT, ASSERT_NOT, GROUPREF_EXISTS, ATOMIC_GROUP, POSSESSIVE

    def at(self, where: Any, flags: int) -> str:
        if where is sre.AT_BEGINNING_STRING or (where is sre.AT_BEGINNING and not flags & _MULTILINE):
            return r"\A"
        if where is sre.AT_BEGINNING:
            return "(?m:^)"
        if where is sre.AT_END_STRING:
            return r"\z"
        if where is sre.AT_END:
            if flags & _MULTILINE:
                return "(?m:$)"  # before any "\n" or at the end, in both
            self.final_newline_differs = True
            return r"\z"
        if where in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY):
            if not flags & _ASCII:
                self.needs_ascii_text = True  # on ASCII text, Python's Unicode \w is [A-Za-z0-9_], as RE2's
            return r"\b" if where is sre.AT_BOUNDARY else r"\B"
        raise _Inexpressible(str(where))


class SafeRegex:
    """One REGEX condition value, compiled: `matches(text)` is `re.compile(pattern).match(text) is not None`,
    answered in time linear in the text where RE2 can, and within DEADLINE_SECONDS otherwise."""

    __slots__ = ("_bounded", "_final_newline_differs", "_needs_ascii_text", "_re2", "_timed_out", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        with warnings.catch_warnings():  # "possible nested set" and the like: the engine's warnings, not ours
            warnings.simplefilter("ignore")
            re.compile(pattern)  # raises re.error where flag-engine raises it
            parsed = sre_parse.parse(pattern)
        self._re2: Any = None
        self._final_newline_differs = self._needs_ascii_text = False
        translation = _Translation()
        try:
            source = translation.sequence(parsed, parsed.state.flags)
        except (_Inexpressible, RecursionError):
            pass
        else:
            compiled = _re2.RE2(source.encode(), _RE2_OPTIONS)
            if compiled.ok():  # else: too large a program for RE2's memory budget
                self._re2 = compiled
                self._final_newline_differs = translation.final_newline_differs
                self._needs_ascii_text = translation.needs_ascii_text
        self._bounded: Any = None
        self._timed_out = False

    @property
    def linear(self) -> bool:
        """Whether RE2 answers (for texts without the few exceptions above)."""
        return self._re2 is not None

    def matches(self, text: str) -> bool:
        if len(text) > MAX_TEXT:
            return False
        compiled = self._re2
        if (
            compiled is not None
            and not (self._final_newline_differs and text[-1:] == "\n")
            and not (self._needs_ascii_text and not text.isascii())
        ):
            try:
                data = text.encode()
            except UnicodeEncodeError:  # a lone surrogate: not UTF-8, so not for RE2
                pass
            else:
                return bool(compiled.Match(_ANCHOR_START, data, 0, len(data))[0][0] >= 0)
        return self._match_bounded(text)

    def _match_bounded(self, text: str) -> bool:
        if self._bounded is None:
            try:
                self._bounded = regex.compile(self.pattern, regex.VERSION0)
            except regex.error as exc:
                log.warning("REGEX %s: neither RE2 nor the regex package reads it (%s): never matches", self, exc)
                self._bounded = False
        if self._bounded is False:
            return False
        try:
            return self._bounded.match(text, timeout=DEADLINE_SECONDS) is not None
        except TimeoutError:
            timeouts[0] += 1
            if not self._timed_out:
                self._timed_out = True
                log.warning("REGEX %s: a match ran out of its %.0f ms: no match", self, DEADLINE_SECONDS * 1e3)
            return False

    def __str__(self) -> str:
        shown = self.pattern if len(self.pattern) <= 80 else self.pattern[:80] + "…"
        return repr(shown)


@lru_cache(maxsize=4096)
def compile_safe(pattern: str) -> SafeRegex:
    """The compiled form of a condition value (shared by the compiled evaluator and flag-engine's matcher)."""
    return SafeRegex(pattern)


def engine_regex(segment_value: Any, context_value: Any) -> bool:
    """flag-engine's REGEX matcher (`_evaluate_regex`), with the safe match instead of `re`'s."""
    return context_value is not None and compile_safe(str(segment_value)).matches(str(context_value))


def install_in_flag_engine() -> None:
    """Route flag-engine's REGEX conditions through `engine_regex`, for every path that reaches the engine
    (an environment or segment the compiled evaluator hands over, one request's unusual traits, environment
    flags). The engine looks its matcher up in this table on each condition."""
    engine_evaluator.MATCHERS_BY_OPERATOR["REGEX"] = engine_regex
