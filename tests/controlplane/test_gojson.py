"""
Go's encoding/json and time, as plexagent.controlplane.gojson emulates them.
Each expectation here is what Go 1.24 does (the Go-made vectors in
tests/controlplane/vectors pin the same rules end to end).
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from plexagent.controlplane import gojson
from plexagent.controlplane.gojson import GoTime


class EncodeStringTests(unittest.TestCase):
    def test_html_characters_are_escaped(self) -> None:
        self.assertEqual(gojson.encode_string("<b>&</b>"), b'"\\u003cb\\u003e\\u0026\\u003c/b\\u003e"')

    def test_line_and_paragraph_separators_are_escaped(self) -> None:
        self.assertEqual(gojson.encode_string("a\u2028b\u2029"), b'"a\\u2028b\\u2029"')

    def test_named_escapes_and_lower_case_hex_for_other_controls(self) -> None:
        self.assertEqual(gojson.encode_string('"\\\b\f\n\r\t\x00\x1f'), b'"\\"\\\\\\b\\f\\n\\r\\t\\u0000\\u001f"')

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
    def test_what_go_writes_go_reads_back(self, text: str) -> None:
        self.assertEqual(gojson.unquote(gojson.encode_string(text)), text)

    def test_non_ascii_del_and_replacement_character_are_written_raw(self) -> None:
        self.assertEqual(gojson.encode_string("ü\x7f\ufffd/"), '"ü\x7f\ufffd/"'.encode())


class UnquoteTests(unittest.TestCase):
    def test_escapes_are_decoded(self) -> None:
        self.assertEqual(gojson.unquote(b'"a\\u00fc\\/\\n\\""'), 'aü/\n"')

    def test_invalid_utf8_becomes_one_replacement_per_byte(self) -> None:
        # Python's own "replace" would merge the truncated sequence into one.
        self.assertEqual(gojson.unquote(b'"a\xe2\x80b\xff"'), "a\ufffd\ufffdb\ufffd")

    def test_a_surrogate_pair_is_one_code_point(self) -> None:
        self.assertEqual(gojson.unquote(b'"\\ud83d\\ude00"'), "\U0001f600")

    def test_a_lone_surrogate_becomes_a_replacement_and_the_next_escape_stands_alone(self) -> None:
        self.assertEqual(gojson.unquote(b'"\\ud800\\u0041"'), "\ufffdA")
        self.assertEqual(gojson.unquote(b'"\\udc00x"'), "\ufffdx")


class CompactTests(unittest.TestCase):
    def test_whitespace_between_tokens_goes_and_inside_strings_stays(self) -> None:
        self.assertEqual(gojson.compact(b'{ "a b" : [ 1 ,\n 2 ] }'), b'{"a b":[1,2]}')

    def test_order_duplicates_numbers_and_escapes_are_kept(self) -> None:
        raw = b'{"z":1.0,"a":2e3,"z":"\\u00fc\\/"}'
        self.assertEqual(gojson.compact(raw), raw)

    def test_html_and_separators_inside_strings_are_escaped(self) -> None:
        self.assertEqual(gojson.compact('{"<":"&\u2028>"}'.encode()), b'{"\\u003c":"\\u0026\\u2028\\u003e"}')

    def test_an_escaped_quote_does_not_end_a_string(self) -> None:
        self.assertEqual(gojson.compact(b'["a\\" b", "c"]'), b'["a\\" b","c"]')

    @settings(max_examples=200, deadline=None)
    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20),
           st.sampled_from([None, 0, 2, "\t"]))
    def test_compacting_any_indentation_gives_go_s_compact_form(self, value: object, indent: object) -> None:
        pretty = json.dumps(value, indent=indent, ensure_ascii=False).encode("utf-8", "surrogatepass")
        try:
            pretty.decode("utf-8")
        except UnicodeDecodeError:
            return  # lone surrogates: not UTF-8 text
        self.assertEqual(gojson.compact(pretty), gojson.marshal(value))


class MembersTests(unittest.TestCase):
    def test_members_in_order_with_raw_bytes(self) -> None:
        self.assertEqual(gojson.members(b' {"a" : 1 , "b":{"c":[ ]}} '), [(b'"a"', b"1"), (b'"b"', b'{"c":[ ]}')])

    def test_null_is_no_members(self) -> None:
        self.assertIsNone(gojson.members(b"null"))

    def test_another_top_level_value_is_a_type_error(self) -> None:
        self.assertRaises(gojson.GoTypeError, gojson.members, b"[1]")

    def test_trailing_data_a_second_object_and_a_bom_are_syntax_errors(self) -> None:
        for raw in (b'{"a":1} x', b'{"a":1}{"b":2}', b'\xef\xbb\xbf{"a":1}', b"", b'{"a":NaN}', b'{"a":1,}'):
            self.assertRaises(gojson.GoSyntaxError, gojson.members, raw)

    def test_control_characters_inside_strings_are_refused(self) -> None:
        self.assertRaises(gojson.GoSyntaxError, gojson.members, b'{"a":"x\ny"}')

    def test_bytes_over_0x7f_inside_strings_are_accepted(self) -> None:
        self.assertEqual(gojson.members(b'{"a":"\xff"}'), [(b'"a"', b'"\xff"')])


class DecodeStructTests(unittest.TestCase):
    SCHEMA = {"name": gojson.STRING, "at": gojson.TIME, "body": gojson.RAW}

    def test_names_match_case_insensitively_with_go_s_unicode_folding(self) -> None:
        decoded = gojson.decode_struct('{"NAME":"a","\u212aey":1,"bOdy":[]}'.encode(), self.SCHEMA)
        self.assertEqual((decoded["name"], decoded["body"]), ("a", b"[]"))
        self.assertEqual(gojson.decode_struct('{"\u017fignature":"x"}'.encode(), {"signature": gojson.STRING}),
                         {"signature": "x"})

    def test_the_last_duplicate_wins_but_null_leaves_a_string_alone(self) -> None:
        decoded = gojson.decode_struct(b'{"name":"a","name":"b","name":null,"body":1,"body":null}', self.SCHEMA)
        self.assertEqual((decoded["name"], decoded["body"]), ("b", b"null"))

    def test_absent_members_are_empty_strings_and_none(self) -> None:
        self.assertEqual(gojson.decode_struct(b"{}", self.SCHEMA), {"name": "", "at": None, "body": None})

    def test_a_wrong_type_fails_the_decode(self) -> None:
        self.assertRaises(gojson.GoTypeError, gojson.decode_struct, b'{"name":1}', self.SCHEMA)

    def test_a_bad_time_fails_at_once_even_after_a_type_error(self) -> None:
        self.assertRaises(gojson.GoTimeError, gojson.decode_struct, b'{"name":1,"at":"yesterday"}', self.SCHEMA)


class GoTimeTests(unittest.TestCase):
    def parse(self, text: str) -> GoTime:
        return GoTime.parse(text.encode())

    def test_fraction_trailing_zeros_and_zero_offsets_are_normalised_on_writing(self) -> None:
        self.assertEqual(self.parse("2026-11-29T19:49:19.120000+00:00").marshal(), b"2026-11-29T19:49:19.12Z")
        self.assertEqual(self.parse("2026-11-29T19:49:19.000-00:00").marshal(), b"2026-11-29T19:49:19Z")
        self.assertEqual(self.parse("2026-11-29T21:49:19.000+02:00").marshal(), b"2026-11-29T21:49:19+02:00")

    def test_more_than_nine_fraction_digits_are_truncated(self) -> None:
        self.assertEqual(self.parse("2026-01-01T00:00:00.1234567899Z").nsec, 123456789)

    def test_go_s_lenient_fallback_accepts_a_one_digit_hour_comma_and_minutes_of_60(self) -> None:
        self.assertEqual(self.parse("2026-01-01T9:49:19-10:00").marshal(), b"2026-01-01T09:49:19-10:00")
        self.assertEqual(self.parse("2026-01-01T00:00:00,5Z").nsec, 500000000)
        self.assertEqual(self.parse("2026-01-01T00:00:00+01:60").marshal(), b"2026-01-01T00:00:00+02:00")

    def test_an_offset_of_24_hours_parses_but_cannot_be_written(self) -> None:
        moment = self.parse("2026-01-01T00:00:00+24:00")
        self.assertRaises(gojson.GoTimeError, moment.marshal)

    def test_what_go_refuses(self) -> None:
        for text in ("2026-01-01t00:00:00Z", "2026-01-01T00:00:00z", "2026-01-01 00:00:00Z", "2026-01-01T00:00:00+0200",
                     "2026-01-01T00:00:00+2:00", "2026-01-01T00:00:00.Z", "2026-01-01T00:00:60Z", "2026-01-01",
                     "2026-02-30T00:00:00Z", "", "2026-01-01T00:00:00Zjunk"):
            self.assertRaises(gojson.GoTimeError, GoTime.parse, text.encode())

    def test_unix_nanoseconds_account_for_the_offset(self) -> None:
        self.assertEqual(self.parse("1970-01-01T01:00:00.5+01:00").unix_ns, 500_000_000)

    def test_the_zero_time_and_year_zero(self) -> None:
        self.assertTrue(self.parse("0001-01-01T00:00:00Z").is_zero())
        self.assertEqual(self.parse("0000-02-29T00:00:00Z").marshal(), b"0000-02-29T00:00:00Z")

    def test_from_unix_ns_writes_utc_as_go_does(self) -> None:
        self.assertEqual(GoTime.from_unix_ns(1_764_445_759_120_000_000).marshal(), b"2025-11-29T19:49:19.12Z")
        self.assertEqual(GoTime.from_unix_ns(0).marshal(), b"1970-01-01T00:00:00Z")

    @settings(max_examples=300, deadline=None)
    @given(st.integers(min_value=-62135596800 * 10**9, max_value=253402300799 * 10**9 + 999999999),
           st.integers(min_value=-23 * 60, max_value=23 * 60))
    def test_writing_then_parsing_is_the_same_instant(self, ns: int, minutes: int) -> None:
        moment = GoTime.from_unix_ns(ns, minutes * 60)
        if not 0 <= moment.wall[0] <= 9999:
            return
        self.assertEqual(GoTime.parse(moment.marshal()).unix_ns, ns)

    def test_unmarshal_null_is_no_change_and_other_json_is_an_error(self) -> None:
        self.assertIsNone(gojson.unmarshal_time(b"null"))
        self.assertRaises(gojson.GoTimeError, gojson.unmarshal_time, b"1")
        # Go 1.24 does not decode escapes inside a time string.
        self.assertRaises(gojson.GoTimeError, gojson.unmarshal_time, b'"2026-01-01T00:00:00\\u002e1Z"')


class StdBase64Tests(unittest.TestCase):
    def test_padding_is_required_and_the_url_alphabet_refused(self) -> None:
        self.assertEqual(gojson.std_b64decode("AAE="), b"\x00\x01")
        for text in ("AAE", "AA-_", "AA E=", "A==="):
            self.assertRaises(ValueError, gojson.std_b64decode, text)

    def test_cr_and_lf_are_skipped(self) -> None:
        self.assertEqual(gojson.std_b64decode("AA\r\nE="), b"\x00\x01")


class MarshalTests(unittest.TestCase):
    def test_floats_as_go_writes_them(self) -> None:
        cases = {1.0: b"1", 2e3: b"2000", 1e20: b"100000000000000000000", 1e21: b"1e+21", 1.5e-7: b"1.5e-7",
                 1e-6: b"0.000001", 1e-10: b"1e-10", -0.0: b"-0", 0.1: b"0.1"}
        for value, expected in cases.items():
            self.assertEqual(gojson.marshal(value), expected, value)

    def test_objects_keep_their_order_and_strings_are_go_escaped(self) -> None:
        self.assertEqual(gojson.marshal({"z": [1, None, True], "a": "<"}), b'{"z":[1,null,true],"a":"\\u003c"}')

    def test_nan_cannot_be_written(self) -> None:
        self.assertRaises(ValueError, gojson.marshal, float("nan"))


class DurationTests(unittest.TestCase):
    def test_durations_as_go_prints_them(self) -> None:
        self.assertEqual([gojson.go_duration(s) for s in (0, 45, 120, 3723, 86400)],
                         ["0s", "45s", "2m0s", "1h2m3s", "24h0m0s"])
