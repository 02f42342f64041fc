"""
Strict parsers for what clients send: JSON documents and integers.

``parse_json`` is the one JSON parser for every request body (and for
anything else the agent must not trust): RFC 8259 JSON in UTF-8, and
nothing more. Python's ``json`` module on its own accepts ``NaN``,
``Infinity`` and ``-Infinity``, lone surrogate escapes (``"\\udc00"``, which
no UTF-8 encoder can write back), numbers that do not fit (``1e400`` becomes
``inf``; a 5000-digit integer), and it recurses once per nesting level, so
a deep document is a ``RecursionError``. Each of these is refused here with
``errors.InvalidInput`` whose details say what and where.

``parse_int`` is the one integer parser for client-supplied strings:
``int()`` also accepts ``"1_0"``, ``" 7 "``, ``"+7"`` and non-ASCII digits
(``"١٢"``); here only ASCII digits (and a leading ``-`` where the caller
allows it) are an integer.

Neither knows anything of HTTP: domain code and loaders may use them too.
"""

from __future__ import annotations

import json
import math
import re
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

from plexagent import errors

#: Deepest nesting of arrays and objects accepted.
MAX_DEPTH = 64
#: Largest document ``parse_json`` accepts unless told otherwise.
MAX_BYTES = 64 << 20
#: Most values (numbers, strings, arrays, objects...) a document may hold:
#: parsing costs time per value, on the thread that serves every client.
MAX_VALUES = 100_000
#: Integers must fit a signed 64-bit integer (what other JSON readers keep exactly).
INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1

_SURROGATE = re.compile("[\ud800-\udfff]")
# A \u escape of a surrogate anywhere in the text: only then can the parsed
# document hold a lone one (the UTF-8 decoder already refuses raw ones).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_FOLD_BRACKETS = bytes.maketrans(b"{}", b"[]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNSIGNED = re.compile(r"[0-9]{1,19}")
_SIGNED = re.compile(r"-?[0-9]{1,19}")


class _Refused(Exception):
    """Raised by the number and constant hooks; carries the literal."""

    def __init__(self, literal: str, why: str) -> None:
        super().__init__(literal)
        self.literal = literal
        self.why = why


def _refuse_constant(name: str) -> Any:
    raise _Refused(name, f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _Refused(literal, f"{literal} is too large for a 64-bit floating-point number")
    return value


def _bounded_int(literal: str) -> int:
    # Refuse by length before int() does any work on a huge literal.
    if len(literal) > 20 or not INT_MIN <= int(literal) <= INT_MAX:
        shown = literal if len(literal) <= 40 else literal[:20] + "..."
        raise _Refused(literal, f"{shown} is outside the signed 64-bit integer range")
    return int(literal)


def _line_column(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {column}"


#: Where the position of a refusal is looked for: past this many characters
#: a message says what, not where (finding it costs a pass in Python).
_LOCATE_WITHIN = 64 << 10
# What the position scan stops at: a string's opening quote or a bracket.
_QUOTE_OR_BRACKET = re.compile(r'["\[\]{}]')


def _outside_strings(text: str) -> Any:
    """
    (start, end) of each run of ``text`` outside JSON strings, then
    ("[", pos) and so on for each bracket, in order; each string is skipped
    by the C scanner, so the whole pass is linear in the text (a regex over
    strings retries at every quote of an unterminated one: quadratic).
    """
    pos, limit = 0, min(len(text), _LOCATE_WITHIN)
    while pos < limit:
        match = _QUOTE_OR_BRACKET.search(text, pos, limit)
        if match is None:
            yield "run", pos, limit
            return
        yield "run", pos, match.start()
        if match.group() != '"':
            yield match.group(), match.start(), match.end()
            pos = match.end()
            continue
        try:
            _, pos = scanstring(text, match.end(), False)
        except ValueError:
            return  # an unterminated string: nothing after it is outside one


def _where_too_deep(text: str, max_depth: int) -> str:
    depth = 0
    for kind, start, _ in _outside_strings(text):
        if kind in ("[", "{"):
            depth += 1
            if depth > max_depth:
                return " at " + _line_column(text, start)
        elif kind in ("]", "}"):
            depth -= 1
    return ""


def _where_literal(text: str, literal: str) -> str:
    """The position of ``literal`` as a token outside strings, for messages."""
    pattern = re.compile(r"(?<![\w.+-])" + re.escape(literal) + r"(?![\w.+-])")
    for kind, start, end in _outside_strings(text):
        if kind == "run":
            found = pattern.search(text, start, end)
            if found is not None:
                return " at " + _line_column(text, found.start())
    return ""


def _outside_strings_bytes(raw: bytes) -> bytes:
    """
    The bytes of ``raw`` outside its strings, in a few C-speed passes: first
    the escaped backslashes (pairs, from the left, as JSON reads them) and
    escaped quotes go, then the runs between quotes alternate between
    outside and inside a string.
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Every other run between quotes is outside a string.
    return b"".join(unescaped.split(b'"')[0::2])


def _nests_deeper(brackets: bytes, max_depth: int) -> bool:
    """Whether ``brackets`` (only ``[`` and ``]``) nest deeper than ``max_depth``."""
    if b"[" * (max_depth + 1) in brackets:
        return True
    passes = 0
    while brackets and passes < max_depth:
        # Each pass takes away exactly the innermost level.
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            break
        brackets = shorter
        passes += 1
    # What is left is deeper than the passes took apart, or unbalanced (not
    # JSON): either way the parser could recurse that deep before failing.
    return bool(brackets) and passes + brackets.count(b"[") > max_depth


def _path(parts: tuple[Any, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part):
            out += f".{part}" if out else part
        else:
            # ensure_ascii: the name may hold the very surrogate refused.
            out += f"[{json.dumps(part, ensure_ascii=True)}]"
    return out or "the top level"


def _lone_surrogate(document: Any) -> str | None:
    """Where the first lone surrogate in ``document`` is, or None."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(document, ())]
    while stack:
        value, parts = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return f"a lone surrogate in the string at {_path(parts)}"
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    return f"a lone surrogate in a member name at {_path(parts)}: {json.dumps(key)}"
                stack.append((item, parts + (key,)))
        elif isinstance(value, list):
            stack.extend((item, parts + (i,)) for i, item in enumerate(value))
    return None


def parse_json(
    data: bytes | bytearray | str,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_values: int = MAX_VALUES,
    error: str = "invalid JSON body",
) -> Any:
    """
    The JSON document in ``data`` (UTF-8 bytes or text), or
    ``errors.InvalidInput(error, details)`` when it is not strict JSON:
    not UTF-8, larger than ``max_bytes``, nested deeper than ``max_depth``,
    holding ``max_values`` values or more,
    holding NaN/Infinity, a non-finite float, an integer outside the signed
    64-bit range, or a lone surrogate in a string or member name.
    """

    def refused(details: str) -> errors.InvalidInput:
        return errors.InvalidInput(error, details)

    if isinstance(data, str):
        found = _SURROGATE.search(data)
        if found is not None:
            raise refused(f"a lone surrogate at {_line_column(data, found.start())}")
        raw = data.encode("utf-8")
    else:
        raw = bytes(data)
    if len(raw) > max_bytes:
        raise refused(f"the document is {len(raw)} bytes; the limit is {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise refused(f"the document is not UTF-8 (byte {e.start})") from None
    too_deep = f"arrays and objects nest deeper than {max_depth} levels"
    # The structure is checked before parsing, each check a C-speed pass:
    # the count of separators and brackets bounds the values, and is only
    # looked at closely (outside strings) when the crude count is too high.
    crude = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if crude >= max_values or crude > max_depth:
        outside = _outside_strings_bytes(raw)
        brackets = outside.translate(_FOLD_BRACKETS, _NOT_BRACKETS)
        if b"[" * (max_depth + 1) in brackets:
            raise refused(too_deep + _where_too_deep(text, max_depth))
        # In JSON, separators plus containers plus one is the count of values
        # (one more for each empty array or object: a bound, never short).
        if outside.count(b",") + len(brackets) // 2 >= max_values:
            raise refused(f"the document holds more than {max_values} values")
        if _nests_deeper(brackets, max_depth):
            raise refused(too_deep + _where_too_deep(text, max_depth))
    try:
        # The C scanner is linear in the text; it stops at the interpreter's
        # recursion limit (about 1000 levels) with a RecursionError, so a
        # deep document costs no more than its first thousand brackets.
        document = json.loads(
            text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int
        )
    except _Refused as e:
        raise refused(e.why + _where_literal(text, e.literal)) from None
    except json.JSONDecodeError as e:
        # Some of json's messages end in "at" already ("Unterminated string starting at").
        raise refused(f"{e.msg.removesuffix(' at')} at {_line_column(text, e.pos)}") from None
    except RecursionError:  # pragma: no cover - the structure check refuses these first
        raise refused(too_deep) from None
    if _SURROGATE_ESCAPE.search(raw):
        where = _lone_surrogate(document)
        if where is not None:
            raise refused(where)
    return document


def parse_int(value: object, *, signed: bool = False) -> int:
    """
    ``value`` as an integer: an ``int`` (not a bool) or a string of ASCII
    digits, with one leading ``-`` only when ``signed``; at most 19 digits
    and within the signed 64-bit range. Anything else (whitespace, ``+``,
    ``_``, non-ASCII digits, a trailing newline) raises ``ValueError``,
    like ``int()`` does for what it refuses.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    if isinstance(value, int):
        number = value
    else:
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                raise ValueError(f"{value!r} is not an integer") from None
        if not isinstance(value, str) or not (_SIGNED if signed else _UNSIGNED).fullmatch(value):
            raise ValueError(f"{value!r} is not an integer")
        number = int(value)
    if not INT_MIN <= number <= INT_MAX or (number < 0 and not signed):
        raise ValueError(f"{value!r} is out of range")
    return number
