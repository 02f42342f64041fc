"""
The one strict JSON parser and the one strict integer parser: what each
refuses (and says where), what each accepts, and that hostile input is a
value or the project's own error, never a crash.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from plexagent import errors
from plexagent.strictparse import MAX_DEPTH, parse_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


class RefusedDocuments(unittest.TestCase):
    """Each refusal is 'invalid JSON body' with details naming what and where."""

    def refused(self, document: bytes | str) -> str:
        e = self.assertRaises(errors.InvalidInput, parse_json, document)
        self.assertEqual(e.message, "invalid JSON body")
        self.assertIsInstance(e.details, str)
        # The details go into a UTF-8 error document: they must encode.
        e.details.encode("utf-8")
        return e.details

    def test_nan_and_infinity_literals_are_refused_with_their_position(self) -> None:
        for literal in ("NaN", "Infinity", "-Infinity"):
            details = self.refused(f'{{"a": [1, {literal}]}}'.encode())
            self.assertIn(literal, details)
            self.assertIn("line 1, column 11", details)

    def test_a_float_too_large_for_a_double_is_refused(self) -> None:
        for literal in ("1e400", "-1e400", "1.5E+309"):
            details = self.refused(f'{{"payload": {literal}}}'.encode())
            self.assertIn(literal, details)
            self.assertIn("column 13", details)

    def test_integers_outside_the_signed_64_bit_range_are_refused(self) -> None:
        for literal in (str(1 << 63), str(-(1 << 63) - 1), "1" * 5000):
            details = self.refused(f"[{literal}]".encode())
            self.assertIn("signed 64-bit integer range", details)

    def test_a_lone_surrogate_escape_in_a_string_is_refused_with_its_path(self) -> None:
        for escape in ("\\udc00", "\\ud800", "x\\uDBFFy", "\\ude00\\ud83d"):
            details = self.refused(('{"payload": {"items": [1, "' + escape + '"]}}').encode())
            self.assertEqual(details, "a lone surrogate in the string at payload.items[1]")

    def test_a_lone_surrogate_escape_in_a_member_name_is_refused(self) -> None:
        details = self.refused(b'{"payload": {"\\udc00": 1}}')
        self.assertEqual(details, 'a lone surrogate in a member name at payload: "\\udc00"')

    def test_a_lone_surrogate_in_text_given_as_str_is_refused(self) -> None:
        self.assertIn("lone surrogate", self.refused('["\udc00"]'))

    def test_nesting_deeper_than_the_limit_is_refused_with_its_position(self) -> None:
        depth = MAX_DEPTH + 1
        details = self.refused(b"[" * depth + b"]" * depth)
        self.assertEqual(details, f"arrays and objects nest deeper than {MAX_DEPTH} levels at line 1, column {depth}")

    def test_a_hundred_thousand_levels_are_refused_without_recursing(self) -> None:
        for document in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                         b"[" * 100_000):
            self.assertIn("nest deeper than", self.refused(document))

    def test_an_unterminated_string_of_escaped_quotes_is_refused(self) -> None:
        # The shape that made a regex over strings retry at every quote.
        document = b"[" * (MAX_DEPTH + 1) + b'"' + b'\\"' * 50_000
        self.assertIn("nest deeper than", self.refused(document))
        self.assertIn("Unterminated string", self.refused(b'["' + b'\\"' * 50_000))

    def test_more_values_than_the_limit_are_refused_before_parsing(self) -> None:
        for document in (b"[" + b"1," * 100_000 + b"1]", b"[" + b"[]," * 100_000 + b"[]]",
                         b"[" + b'"a",' * 100_000 + b'"a"]'):
            e = self.assertRaises(errors.InvalidInput, parse_json, document, max_values=100)
            self.assertIn("more than 100 values", e.details)

    def test_commas_and_brackets_inside_strings_are_not_values(self) -> None:
        text = '\\",[{' * 50_000 + '\\'
        self.assertEqual(parse_json(json.dumps({"content": text}).encode(), max_values=10), {"content": text})

    def test_brackets_inside_strings_do_not_count_as_nesting(self) -> None:
        text = "[" * 500 + '\\"{'
        self.assertEqual(parse_json(json.dumps({"a": text}).encode()), {"a": text})

    def test_a_document_over_the_size_limit_is_refused(self) -> None:
        e = self.assertRaises(errors.InvalidInput, parse_json, b"[" + b"1," * 100 + b"1]", max_bytes=100)
        self.assertEqual(e.details, "the document is 203 bytes; the limit is 100 bytes")

    def test_bytes_that_are_not_utf8_are_refused(self) -> None:
        self.assertEqual(self.refused(b'{"a": "\xff"}'), "the document is not UTF-8 (byte 7)")

    def test_utf16_is_not_sniffed_and_accepted(self) -> None:
        self.assertTrue(self.refused('{"a": 1}'.encode("utf-16")))

    def test_syntax_errors_say_what_and_where(self) -> None:
        self.assertEqual(self.refused(b'{"a": 1,\n  oops}'),
                         "Expecting property name enclosed in double quotes at line 2, column 3")
        self.assertEqual(self.refused(b""), "Expecting value at line 1, column 1")

    def test_the_message_can_name_what_was_parsed(self) -> None:
        e = self.assertRaises(errors.InvalidInput, parse_json, b"NaN", error="invalid JSON in state.json")
        self.assertEqual(e.message, "invalid JSON in state.json")


class AcceptedDocuments(unittest.TestCase):
    @given(json_values, st.integers(min_value=1, max_value=64))
    def test_the_structure_check_agrees_with_a_full_parse(self, value: object, max_values: int) -> None:
        # Escapes and brackets in strings must never fool the count or the depth.
        raw = json.dumps(value).encode()
        count, empty, stack = 0, 0, [value]
        while stack:
            item = stack.pop()
            count += 1
            if isinstance(item, (list, dict)):
                children = list(item.values()) if isinstance(item, dict) else item
                empty += not children
                stack.extend(children)
        try:
            self.assertEqual(parse_json(raw, max_values=max_values), json.loads(raw))
            self.assertLessEqual(count, max_values)
        except errors.InvalidInput as e:
            self.assertIn("more than", e.details)
            # Separators and brackets count the values exactly, each empty array or object once more.
            self.assertGreater(count + empty, max_values)

    def test_nesting_at_the_limit_is_accepted(self) -> None:
        document = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
        self.assertEqual(json.dumps(parse_json(document), separators=(",", ":")).encode(), document)

    def test_64_bit_integer_bounds_and_finite_floats_are_accepted(self) -> None:
        self.assertEqual(parse_json(b"[9223372036854775807, -9223372036854775808, 1e308, 1e-400, -0.0]"),
                         [(1 << 63) - 1, -(1 << 63), 1e308, 0.0, -0.0])

    def test_surrogate_pairs_and_escaped_backslashes_are_accepted(self) -> None:
        self.assertEqual(parse_json(b'["\\ud83d\\ude00", "\\\\udc00"]'), ["\U0001F600", "\\udc00"])

    @given(json_values)
    def test_any_json_value_round_trips(self, value: object) -> None:
        self.assertEqual(parse_json(json.dumps(value).encode()), value)
        self.assertEqual(parse_json(json.dumps(value, ensure_ascii=False)), value)

    @given(st.binary(max_size=200))
    def test_any_bytes_are_a_value_or_invalid_input_never_a_crash(self, raw: bytes) -> None:
        try:
            parse_json(raw)
        except errors.InvalidInput as e:
            self.assertEqual(e.message, "invalid JSON body")

    @given(st.text(alphabet="[]{}\",:0123456789.eE-+ \\nul", max_size=300))
    def test_any_bracket_soup_is_a_value_or_invalid_input_never_a_crash(self, text: str) -> None:
        try:
            parse_json(text.encode())
        except errors.InvalidInput as e:
            self.assertEqual(e.message, "invalid JSON body")
