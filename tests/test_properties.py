"""Property tests for the parsers that see hostile input on the Local Node API."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from plexagent import errors
from plexagent.config import ConfigError, parse_config
from plexagent.node.reports import MAX_KEY_LENGTH, validate_key
from plexagent.node.routes import parse_if_match, parse_report_body

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


class FakeRequest:
    def __init__(self, if_match: bytes | None) -> None:
        self._if_match = if_match

    def getHeader(self, name: bytes) -> bytes | None:
        return self._if_match


class IfMatchProperties(unittest.TestCase):
    @given(st.integers(min_value=0, max_value=10**17))
    def test_non_negative_integers_parse(self, n: int) -> None:
        self.assertEqual(parse_if_match(FakeRequest(str(n).encode())), n)

    @given(st.binary(max_size=40))
    def test_anything_else_is_invalid_input_never_a_crash(self, raw: bytes) -> None:
        try:
            value = parse_if_match(FakeRequest(raw))
        except errors.InvalidInput as e:
            self.assertEqual(e.message, "If-Match must be an integer")
        else:
            self.assertIsInstance(value, int)
            self.assertGreaterEqual(value, 0)


class ReportBodyProperties(unittest.TestCase):
    @given(json_values)
    def test_any_json_body_is_accepted_or_refused_with_the_guides_messages(self, body: object) -> None:
        try:
            content_type, payload = parse_report_body(body)
        except errors.InvalidInput as e:
            self.assertIn(e.message, ("invalid JSON body", "content_type is required", "content_type must be a string",
                                      "payload must be valid JSON"))
        else:
            self.assertTrue(content_type)


class KeyProperties(unittest.TestCase):
    @given(st.text(max_size=600))
    def test_keys_are_accepted_only_when_printable_and_short(self, key: str) -> None:
        try:
            validate_key(key)
        except errors.InvalidInput as e:
            self.assertEqual(e.message, "invalid key")
        else:
            self.assertTrue(key)
            self.assertLessEqual(len(key.encode("utf-8")), MAX_KEY_LENGTH)
            self.assertFalse(any(ord(c) < 0x20 for c in key))


class ConfigProperties(unittest.TestCase):
    @settings(max_examples=300)
    @given(
        st.dictionaries(
            st.sampled_from(["node", "control_plane", "node_api", "agent_api", "docker", "bogus"]),
            st.dictionaries(st.text(max_size=20), json_values, max_size=4) | json_values,
            max_size=3,
        ),
        st.dictionaries(
            st.sampled_from(["NODE_AGENT_ALLOWED_IPS", "NODE_AGENT_REQUIRE_AUTH_ALWAYS", "DOCKER_HOST"]),
            st.text(max_size=30),
            max_size=3,
        ),
    )
    def test_any_document_gives_a_config_or_a_one_line_error(self, document: dict, environ: dict) -> None:
        try:
            parse_config(document, environ)
        except ConfigError as e:
            message = str(e)
            self.assertTrue(message)
            self.assertNotIn("\n", message)
