"""
Go's ``encoding/json`` and ``time`` as a Go control plane and plexd apply
them, emulated byte for byte where a signature depends on it.

plexd verifies an event's Ed25519 signature over bytes it builds with Go
(``json.Marshal`` of the envelope it parsed with ``json.Unmarshal``): the
agent must rebuild exactly those bytes, or a genuine event fails to verify
and a forged one might pass. What lives here:

- ``members``/``decode_struct``: a top-level object decoded as Go decodes
  one into a struct (member names folded, the last duplicate wins, ``null``
  leaves a string alone, a wrong type fails the whole decode);
- ``unquote``/``encode_string``/``compact``: strings and raw values as Go
  reads and writes them (HTML characters and U+2028/9 escaped, invalid
  UTF-8 replaced per byte);
- ``GoTime``: RFC 3339 parsed as Go 1.24's ``Time.UnmarshalJSON`` does
  (its lenient fallback included) and written as ``Time.MarshalJSON``;
- ``std_b64decode`` (``base64.StdEncoding``), ``marshal`` (values as Go
  writes them, floats included) and ``go_duration`` (``Duration.String``).

The test vectors in ``tests/controlplane/vectors`` were made by Go itself
and pin every rule here.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import decimal
import functools
import json
import math
import re
from typing import Any, Mapping

# -- errors -------------------------------------------------------------


class GoSyntaxError(ValueError):
    """Not JSON as Go's scanner accepts it (trailing data included)."""


class GoTypeError(ValueError):
    """JSON Go would refuse to put into the target (a number for a string, ...)."""


class GoTimeError(ValueError):
    """A time Go cannot parse, or cannot write (a zone hour of 24 or more)."""


# -- UTF-8 as Go decodes it ---------------------------------------------


def _go_replace(exc: UnicodeError) -> tuple[str, int]:
    # Go's utf8.DecodeRune yields (RuneError, 1) for an invalid sequence:
    # one U+FFFD per bad byte, where Python's "replace" may merge several.
    assert isinstance(exc, UnicodeDecodeError)
    return "\ufffd", exc.start + 1


codecs.register_error("plexagent-go-replace", _go_replace)


def go_utf8(raw: bytes) -> str:
    """``raw`` as text, each invalid byte becoming one U+FFFD (Go's rule)."""
    return raw.decode("utf-8", "plexagent-go-replace")


# -- strings --------------------------------------------------------------

_ESCAPE = re.compile(rb'\\(?:u([0-9a-fA-F]{4})|(["\\/bfnrt]))')
_SIMPLE = {b'"': '"', b"\\": "\\", b"/": "/", b"b": "\b", b"f": "\f", b"n": "\n", b"r": "\r", b"t": "\t"}


def unquote(raw: bytes) -> str:
    """
    A JSON string literal (quotes included, syntax already checked) as Go
    decodes it: a surrogate pair escape is one code point, any other
    surrogate escape is U+FFFD, invalid UTF-8 is U+FFFD per byte.
    """
    body = raw[1:-1]
    if b"\\" not in body:
        return go_utf8(body)
    out: list[str] = []
    pos = 0
    matches = list(_ESCAPE.finditer(body))
    i = 0
    while i < len(matches):
        m = matches[i]
        out.append(go_utf8(body[pos:m.start()]))
        pos = m.end()
        i += 1
        if m.group(2) is not None:
            out.append(_SIMPLE[m.group(2)])
            continue
        rune = int(m.group(1), 16)
        if 0xD800 <= rune < 0xE000:
            following = matches[i] if i < len(matches) else None
            if (rune < 0xDC00 and following is not None and following.start() == m.end()
                    and following.group(1) is not None and 0xDC00 <= int(following.group(1), 16) < 0xE000):
                low = int(following.group(1), 16)
                out.append(chr(0x10000 + ((rune - 0xD800) << 10) + (low - 0xDC00)))
                pos = following.end()
                i += 1
            else:
                out.append("\ufffd")
            continue
        out.append(chr(rune))
    out.append(go_utf8(body[pos:]))
    return "".join(out)


_NEEDS_ESCAPE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029]')
_NAMED = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
          "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or "\\u%04x" % ord(c)


def encode_string(text: str) -> bytes:
    """``json.Marshal`` of a Go string (HTML escaping on, lower-case hex)."""
    # A lone surrogate cannot come out of ``unquote``; should one be passed
    # in, Go would have written U+FFFD for it.
    encoded = ('"' + _NEEDS_ESCAPE.sub(_escape, text) + '"').encode("utf-8", "replace")
    return encoded


_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[ \t\r\n]+|[^" \t\r\n]+', re.S)


def compact(raw: bytes) -> bytes:
    """
    A syntax-checked JSON value compacted as ``json.Marshal`` writes a
    ``RawMessage``: whitespace between tokens removed, ``< > &`` and
    U+2028/9 escaped; order, duplicates, number spellings and existing
    escapes (even invalid UTF-8) kept as they are.
    """
    return escape_html(b"".join(t for t in _TOKENS.findall(raw) if t[0] not in b" \t\r\n"))


def escape_html(raw: bytes) -> bytes:
    """
    Compact JSON with ``< > &`` and U+2028/9 escaped as Go escapes them in
    strings. Outside strings these bytes cannot occur in valid JSON:
    replacing them everywhere escapes exactly the ones inside strings.
    """
    return (raw.replace(b"<", b"\\u003c").replace(b">", b"\\u003e").replace(b"&", b"\\u0026")
            .replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029"))


# -- objects --------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _value_end(text: str, i: int) -> int:
    # raw_decode checks one value's grammar at C speed; on latin-1 text
    # bytes >= 0x80 inside strings are accepted as Go's scanner accepts them.
    try:
        _, end = _DECODER.raw_decode(text, i)
    except (ValueError, RecursionError):
        raise GoSyntaxError("invalid JSON") from None
    return end


def _skip(text: str, i: int) -> int:
    m = _WHITESPACE.match(text, i)
    assert m is not None
    return m.end()


def members(buf: bytes) -> list[tuple[bytes, bytes]] | None:
    """
    The members of the top-level object in ``buf`` as (raw name, raw value)
    byte strings, in order; None for a top-level ``null`` (Go leaves the
    struct alone). GoSyntaxError for anything Go's scanner refuses (a BOM,
    trailing data), GoTypeError for another top-level value.
    """
    text = buf.decode("latin-1")  # one character per byte: indices are byte offsets
    i = _skip(text, 0)
    if i == len(text):
        raise GoSyntaxError("empty input")
    if text[i] != "{":
        end = _value_end(text, i)
        if _skip(text, end) != len(text):
            raise GoSyntaxError("data after the top-level value")
        if text[i:end] == "null":
            return None
        raise GoTypeError("not an object")
    found: list[tuple[bytes, bytes]] = []
    i = _skip(text, i + 1)
    if i < len(text) and text[i] == "}":
        i += 1
    else:
        while True:
            if i >= len(text) or text[i] != '"':
                raise GoSyntaxError("member name expected")
            end = _value_end(text, i)
            name = buf[i:end]
            i = _skip(text, end)
            if i >= len(text) or text[i] != ":":
                raise GoSyntaxError("':' expected")
            i = _skip(text, i + 1)
            end = _value_end(text, i)
            found.append((name, buf[i:end]))
            i = _skip(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip(text, i + 1)
                continue
            if i < len(text) and text[i] == "}":
                i += 1
                break
            raise GoSyntaxError("',' or '}' expected")
    if _skip(text, i) != len(text):
        raise GoSyntaxError("data after the top-level value")
    return found


#: The only non-ASCII runes whose simple-fold orbit holds an ASCII letter.
_FOLD = {"\u017f": "S", "\u212a": "K"}


def fold(name: str) -> str:
    """A member name as Go's ``foldName`` compares it (case-insensitively)."""
    if name.isascii():
        return name.upper()
    return "".join(c.upper() if c < "\x80" else _FOLD.get(c, c) for c in name)


#: Field kinds for ``decode_struct``.
STRING = "string"
TIME = "time"
RAW = "raw"


@functools.lru_cache(maxsize=64)
def _folded_names(names: tuple[str, ...]) -> dict[str, str]:
    return {fold(name): name for name in names}


def decode_struct(buf: bytes, schema: Mapping[str, str]) -> dict[str, Any]:
    """
    ``json.Unmarshal(buf, &s)`` for a struct whose fields are named (lower
    case) and typed by ``schema``. Absent fields: ``""`` for strings, None
    for times and raw values. Raises GoSyntaxError, GoTypeError (after the
    whole object, as Go reports the first type error at the end) or
    GoTimeError (at once, as ``Time.UnmarshalJSON`` fails the decode).
    """
    by_fold = _folded_names(tuple(schema))
    found = members(buf)
    out: dict[str, Any] = {name: ("" if kind == STRING else None) for name, kind in schema.items()}
    type_error = False
    for raw_name, raw_value in found or ():
        field = by_fold.get(fold(unquote(raw_name)))
        if field is None:
            continue
        kind = schema[field]
        if kind == RAW:
            out[field] = raw_value
        elif kind == TIME:
            moment = unmarshal_time(raw_value)
            if moment is not None:
                out[field] = moment
        elif raw_value == b"null":
            continue
        elif raw_value[:1] != b'"':
            type_error = True
        else:
            out[field] = unquote(raw_value)
    if type_error:
        raise GoTypeError("a member has the wrong JSON type")
    return out


# -- time ---------------------------------------------------------------------

_NS = 1_000_000_000


def _days_in(month: int, year: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _days_from_civil(y: int, m: int, d: int) -> int:
    # Integer arithmetic (no datetime): year 0 must work.
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return y + (m <= 2), m, d


def _digits(s: bytes) -> bool:
    return bool(s) and all(48 <= c <= 57 for c in s)


def _nanos(fraction: bytes) -> int:
    digits = fraction[:9]  # Go truncates past nanoseconds; it does not round
    return int(digits) * 10 ** (9 - len(digits))


class GoTime:
    """A Go ``time.Time`` as far as JSON carries it: wall clock, nanoseconds, offset."""

    __slots__ = ("wall", "nsec", "offset")

    def __init__(self, wall: tuple[int, int, int, int, int, int], nsec: int = 0, offset: int = 0) -> None:
        self.wall = wall
        self.nsec = nsec
        #: seconds east of UTC
        self.offset = offset

    def __repr__(self) -> str:
        return f"GoTime({self.wall!r}, {self.nsec}, {self.offset})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GoTime) and (self.wall, self.nsec, self.offset) == (other.wall, other.nsec,
                                                                                       other.offset)

    def __hash__(self) -> int:
        return hash((self.wall, self.nsec, self.offset))

    @classmethod
    def from_unix_ns(cls, ns: int, offset: int = 0) -> "GoTime":
        """The instant ``ns`` nanoseconds after the epoch, written with ``offset``."""
        seconds, nsec = divmod(ns, _NS)
        seconds += offset
        days, rest = divmod(seconds, 86400)
        y, m, d = _civil_from_days(days)
        return cls((y, m, d, rest // 3600, rest // 60 % 60, rest % 60), nsec, offset)

    @classmethod
    def parse(cls, text: bytes) -> "GoTime":
        """RFC 3339 as Go 1.24's ``Time.UnmarshalJSON`` accepts it (GoTimeError otherwise)."""
        moment = _parse_fast(text) or _parse_lenient(text)
        if moment is None:
            raise GoTimeError("not an RFC 3339 time")
        return moment

    @property
    def unix_ns(self) -> int:
        y, mo, d, h, mi, s = self.wall
        seconds = _days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s - self.offset
        return seconds * _NS + self.nsec

    def is_zero(self) -> bool:
        """Go's zero time, 0001-01-01T00:00:00Z (plexd takes it as "absent")."""
        return self.unix_ns == ZERO_UNIX_NS

    def marshal(self) -> bytes:
        """``Time.MarshalJSON`` without the quotes (RFC 3339, trailing zeros dropped, ``Z`` for UTC)."""
        y, mo, d, h, mi, s = self.wall
        if not 0 <= y <= 9999:
            raise GoTimeError("year outside of range [0,9999]")
        out = "%04d-%02d-%02dT%02d:%02d:%02d" % (y, mo, d, h, mi, s)
        if self.nsec:
            out += ("." + "%09d" % self.nsec).rstrip("0")
        if self.offset == 0:
            return (out + "Z").encode("ascii")
        zone = abs(self.offset) // 60
        if zone // 60 >= 24:
            raise GoTimeError("timezone hour outside of range [0,23]")
        sign = "-" if self.offset < 0 else "+"
        return (out + sign + "%02d:%02d" % (zone // 60, zone % 60)).encode("ascii")


ZERO_UNIX_NS = -62135596800 * _NS


def _parse_fast(s: bytes) -> GoTime | None:
    """Go's parseStrictRFC3339 fast path."""
    if len(s) < 19:
        return None
    fields = (s[0:4], s[5:7], s[8:10], s[11:13], s[14:16], s[17:19])
    if not all(_digits(f) for f in fields):
        return None
    y, mo, d, h, mi, sec = (int(f) for f in fields)
    if not (1 <= mo <= 12 and 1 <= d <= _days_in(mo, y) and h <= 23 and mi <= 59 and sec <= 59):
        return None
    if s[4:5] != b"-" or s[7:8] != b"-" or s[10:11] != b"T" or s[13:14] != b":" or s[16:17] != b":":
        return None
    rest = s[19:]
    nsec = 0
    if len(rest) >= 2 and rest[0:1] == b"." and _digits(rest[1:2]):
        n = 2
        while n < len(rest) and 48 <= rest[n] <= 57:
            n += 1
        nsec, rest = _nanos(rest[1:n]), rest[n:]
    if rest == b"Z":
        return GoTime((y, mo, d, h, mi, sec), nsec, 0)
    if len(rest) != 6 or rest[0:1] not in (b"+", b"-") or rest[3:4] != b":":
        return None
    if not (_digits(rest[1:3]) and _digits(rest[4:6])):
        return None
    hours, minutes = int(rest[1:3]), int(rest[4:6])
    if hours > 23 or minutes > 59:
        return None
    offset = (hours * 60 + minutes) * 60
    return GoTime((y, mo, d, h, mi, sec), nsec, -offset if rest[0:1] == b"-" else offset)


def _parse_lenient(v: bytes) -> GoTime | None:
    """``time.Parse(time.RFC3339, v)`` with Go 1.24's strict checks switched off (its fallback)."""
    if len(v) < 4 or not _digits(v[0:4]):
        return None
    y, v = int(v[0:4]), v[4:]
    if v[:1] != b"-" or not _digits(v[1:3]):
        return None
    mo, v = int(v[1:3]), v[3:]
    if not 1 <= mo <= 12 or v[:1] != b"-" or not _digits(v[1:3]):
        return None
    d, v = int(v[1:3]), v[3:]
    if v[:1] != b"T" or not _digits(v[1:2]):
        return None
    if _digits(v[2:3]):
        h, v = int(v[1:3]), v[3:]
    else:
        h, v = int(v[1:2]), v[2:]  # a one-digit hour passes here
    if h > 23 or v[:1] != b":" or not _digits(v[1:3]):
        return None
    mi, v = int(v[1:3]), v[3:]
    if mi > 59 or v[:1] != b":" or not _digits(v[1:3]):
        return None
    sec, v = int(v[1:3]), v[3:]
    if sec > 59:
        return None
    nsec = 0
    if len(v) >= 2 and v[0:1] in (b".", b",") and _digits(v[1:2]):
        n = 2
        while n < len(v) and 48 <= v[n] <= 57:
            n += 1
        nsec, v = _nanos(v[1:n]), v[n:]
    if v[:1] == b"Z":
        offset, v = 0, v[1:]
    else:
        if len(v) < 6 or v[3:4] != b":" or not (_digits(v[1:3]) and _digits(v[4:6])):
            return None
        hours, minutes = int(v[1:3]), int(v[4:6])
        if hours > 24 or minutes > 60 or v[0:1] not in (b"+", b"-"):
            return None
        offset = (hours * 60 + minutes) * 60 * (-1 if v[0:1] == b"-" else 1)
        v = v[6:]
    if v or not 1 <= d <= _days_in(mo, y):
        return None
    return GoTime((y, mo, d, h, mi, sec), nsec, offset)


def unmarshal_time(raw: bytes) -> GoTime | None:
    """
    Go 1.24 ``Time.UnmarshalJSON``: None for ``null`` (no change), the time
    of a string literal (its raw bytes: escapes are not decoded), else
    GoTimeError.
    """
    if raw == b"null":
        return None
    if len(raw) < 2 or raw[:1] != b'"' or raw[-1:] != b'"':
        raise GoTimeError("not a JSON string")
    return GoTime.parse(raw[1:-1])


# -- base64 ---------------------------------------------------------------

_STD_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def std_b64decode(text: str) -> bytes:
    """Go's ``base64.StdEncoding.DecodeString``: padding required, ``+/``, CR and LF skipped."""
    text = text.replace("\r", "").replace("\n", "")
    if not _STD_B64.fullmatch(text):
        raise ValueError("not standard base64")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("not standard base64") from None


# -- writing values as Go does ----------------------------------------------


def _go_float(f: float) -> str:
    """strconv.AppendFloat(f, 'f' or 'e', -1, 64) as encoding/json picks it."""
    if not math.isfinite(f):
        raise ValueError("Go's json.Marshal cannot write NaN or Infinity")
    if f == 0:
        return "-0" if math.copysign(1.0, f) < 0 else "0"
    exact = decimal.Decimal(repr(f))  # the shortest digits that round-trip, as Go's -1 precision
    sign, digits, exponent = exact.as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)).rstrip("0") or "0"
    # the value is 0.<text> * 10**point
    point = len(digits) + exponent
    prefix = "-" if sign else ""
    if abs(f) < 1e-6 or abs(f) >= 1e21:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        e = point - 1
        # strconv writes at least two exponent digits; encoding/json then
        # turns "e-07" into "e-7" (and leaves positive exponents alone).
        exponent_text = f"+{e:02d}" if e >= 0 else f"-{-e}"
        return f"{prefix}{mantissa}e{exponent_text}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{text}"
    if point >= len(text):
        return prefix + text + "0" * (point - len(text))
    return f"{prefix}{text[:point]}.{text[point:]}"


def marshal(value: Any) -> bytes:
    """
    ``value`` (dicts in their order, lists, strings, ints, floats, bools,
    None) as Go's ``json.Marshal`` writes the equivalent Go value.
    """
    if value is None:
        return b"null"
    if value is True:
        return b"true"
    if value is False:
        return b"false"
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, float):
        return _go_float(value).encode("ascii")
    if isinstance(value, str):
        return encode_string(value)
    if isinstance(value, Mapping):
        return b"{" + b",".join(encode_string(str(k)) + b":" + marshal(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(marshal(v) for v in value) + b"]"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def go_duration(seconds: int) -> str:
    """Go's ``time.Duration.String`` of whole seconds: ``0s``, ``45s``, ``2m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
