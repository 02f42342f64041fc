"""
Strict JSON for what is stored, and setting aside what cannot be loaded:
the primitives every loader under node.data_dir shares.
"""

from __future__ import annotations

import datetime
import os

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from plexagent import fileio

# 2026-03-04T05:06:07Z
NOW = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.timezone.utc).timestamp()


def capture_logs(testcase: unittest.TestCase) -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class EncodeJSONTests(unittest.TestCase):
    def test_json_values_encode_as_utf8(self) -> None:
        self.assertEqual(fileio.encode_json({"a": [1, 2.5, "é", None, True]}), '{"a":[1,2.5,"é",null,true]}'.encode())

    def test_nan_and_infinity_are_refused_naming_where(self) -> None:
        for bad in (float("nan"), float("inf"), float("-inf")):
            with self.assertRaises(fileio.Unencodable) as caught:
                fileio.encode_json({"payload": {"x": [1, bad]}})
            self.assertEqual(caught.exception.where, "value.payload.x[1]")
            self.assertIn("NaN or infinite", caught.exception.why)

    def test_a_lone_surrogate_is_refused_naming_where(self) -> None:
        with self.assertRaises(fileio.Unencodable) as caught:
            fileio.encode_json({"command": ["sh", "-c", "echo \udc80"]})
        self.assertEqual(caught.exception.where, "value.command[2]")
        self.assertIn("lone surrogate", caught.exception.why)

    def test_a_lone_surrogate_in_an_object_key_is_refused(self) -> None:
        with self.assertRaises(fileio.Unencodable):
            fileio.encode_json({"\ud800": 1})

    def test_a_surrogate_pair_is_text(self) -> None:
        self.assertEqual(fileio.encode_json("\U0001F600"), '"\U0001F600"'.encode())

    def test_types_json_has_no_form_for_are_refused(self) -> None:
        with self.assertRaises(fileio.Unencodable) as caught:
            fileio.encode_json({"a": {1, 2}})
        self.assertEqual(caught.exception.where, "value.a")


class DecodeJSONTests(unittest.TestCase):
    def test_json_decodes(self) -> None:
        self.assertEqual(fileio.decode_json(b'{"a":[1,2.5,"\\u00e9"]}'), {"a": [1, 2.5, "é"]})

    def test_nan_and_infinity_are_refused(self) -> None:
        for bad in (b"NaN", b"[Infinity]", b'{"a":-Infinity}'):
            self.assertRaises(ValueError, fileio.decode_json, bad)

    def test_a_number_too_large_for_a_float_is_refused(self) -> None:
        self.assertRaises(ValueError, fileio.decode_json, b"[1e400]")

    def test_an_escaped_lone_surrogate_is_refused(self) -> None:
        with self.assertRaises(ValueError) as caught:
            fileio.decode_json(b'{"a":["\\udc80"]}')
        self.assertIn("a[0]", str(caught.exception))

    def test_an_escaped_surrogate_pair_and_an_escaped_backslash_are_fine(self) -> None:
        self.assertEqual(fileio.decode_json(b'["\\ud83d\\ude00", "\\\\ud800"]'), ["\U0001F600", "\\ud800"])

    def test_bytes_that_are_not_utf8_are_refused(self) -> None:
        self.assertRaises(ValueError, fileio.decode_json, b'"\xed\xa0\x80"')  # a UTF-8-encoded surrogate
        self.assertRaises(ValueError, fileio.decode_json, b'"\xff"')


class SetAsideTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.logs = capture_logs(self)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_a_file_is_renamed_aside_with_the_utc_time_never_deleted(self) -> None:
        path = self.write("state.json", b"{torn")
        aside = fileio.set_aside(path, "not JSON", now=NOW)
        self.assertEqual(aside, path + ".quarantined-20260304T050607Z")
        self.assertFalse(os.path.exists(path))
        with open(aside, "rb") as f:
            self.assertEqual(f.read(), b"{torn")

    def test_it_is_logged_once_with_the_path_and_why(self) -> None:
        path = self.write("state.json", b"{torn")
        fileio.set_aside(path, "not JSON", now=NOW)
        warnings = [e for e in self.logs if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual((warnings[0]["path"], warnings[0]["why"]), (path, "not JSON"))

    def test_a_second_file_set_aside_in_the_same_second_gets_its_own_name(self) -> None:
        first = fileio.set_aside(self.write("x", b"1"), "bad", now=NOW)
        second = fileio.set_aside(self.write("x", b"2"), "bad", now=NOW)
        self.assertNotEqual(first, second)
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(os.path.basename(p) for p in (first, second)))

    def test_a_directory_can_be_set_aside(self) -> None:
        path = os.path.join(self.dir, "upload")
        os.makedirs(path)
        aside = fileio.set_aside(path, "bad meta.json", now=NOW)
        self.assertTrue(os.path.isdir(aside))
        self.assertTrue(fileio.is_set_aside(os.path.basename(aside)))

    def test_records_are_kept_aside_durably_beside_the_file(self) -> None:
        path = self.write("reports.log", b"good\nbad\n")
        aside = fileio.set_aside_records(path, b"bad\n", 1, "record 2: not JSON", now=NOW)
        self.assertEqual(aside, path + ".quarantined-20260304T050607Z")
        with open(aside, "rb") as f:
            self.assertEqual(f.read(), b"bad\n")
        warnings = [e for e in self.logs if e.get("log_level") == LogLevel.warn]
        self.assertEqual((warnings[0]["count"], warnings[0]["path"]), (1, path))


class ReadStoredTests(unittest.TestCase):
    """Files the agent loads are read only when they are regular files, and bounded."""

    def path(self, name: str) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return os.path.join(directory, name)

    def test_a_regular_file_is_read(self) -> None:
        path = self.path("f")
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        self.assertEqual(fileio.read_stored(path), b"x" * 100)

    def test_a_fifo_is_refused_without_blocking(self) -> None:
        path = self.path("fifo")
        os.mkfifo(path)
        self.assertIn("a FIFO", str(self.assertRaises(ValueError, fileio.read_stored, path)))

    def test_a_link_is_refused_unless_links_are_followed(self) -> None:
        path = self.path("zero")
        os.symlink("/dev/zero", path)
        self.assertIn("symbolic link", str(self.assertRaises(ValueError, fileio.read_stored, path)))
        self.assertIn("a device", str(self.assertRaises(ValueError, fileio.read_stored, path, follow_symlinks=True)))

    def test_a_file_over_the_limit_is_refused(self) -> None:
        path = self.path("big")
        with open(path, "wb") as f:
            f.write(b"x" * 101)
        self.assertIn("more than the 100", str(self.assertRaises(ValueError, fileio.read_stored, path, 100)))

    def test_a_missing_file_is_file_not_found(self) -> None:
        self.assertRaises(FileNotFoundError, fileio.read_stored, self.path("absent"))
