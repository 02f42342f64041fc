"""The SSE parser: plexd's reading of an event stream (docs/control-plane.md, Event stream)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from plexagent.controlplane.events import ServerSentEvent, SSEParser, header_safe_id

NOW = 1_780_000_000.0  # 2026-05-28T...Z


def feed_all(parser: SSEParser, *chunks: bytes) -> list[ServerSentEvent]:
    out: list[ServerSentEvent] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out


class SSEFramingTests(unittest.TestCase):
    """plexd's parser, rule by rule (plexd-sse.json holds what plexd's own code yields)."""

    def test_one_event_with_id_and_type(self) -> None:
        events = SSEParser().feed(b"id: 7\nevent: node_state_updated\ndata: {}\n\n")
        self.assertEqual(events, [ServerSentEvent(data=b"{}", type=b"node_state_updated", id=b"7")])

    def test_multi_line_data_is_joined_with_newlines(self) -> None:
        events = SSEParser().feed(b"data: one\ndata: two\ndata:three\ndata\n\n")
        self.assertEqual([e.data for e in events], [b"one\ntwo\nthree\n"])

    def test_event_type_defaults_to_message(self) -> None:
        self.assertEqual(SSEParser().feed(b"data: x\n\n")[0].type, b"message")

    def test_lines_end_at_lf_and_one_cr_before_it_is_dropped(self) -> None:
        self.assertEqual(SSEParser().feed(b"data: a\r\n\r\n")[0].data, b"a")

    def test_a_lone_cr_is_not_a_line_end(self) -> None:
        events = SSEParser().feed(b"data: a\rb\n\n")
        self.assertEqual([e.data for e in events], [b"a\rb"])

    def test_comments_are_keepalives_and_dispatch_nothing(self) -> None:
        self.assertEqual(SSEParser().feed(b": keep-alive\n\n:\n\n"), [])

    def test_retry_is_ignored(self) -> None:
        self.assertEqual(SSEParser().feed(b"retry: 2500\n\n"), [])

    def test_an_id_belongs_to_its_block_and_is_remembered_when_it_dispatches(self) -> None:
        parser = SSEParser()
        events = parser.feed(b"id: 4\ndata: a\n\ndata: b\n\n")
        self.assertEqual([e.id for e in events], [b"4", b""])
        self.assertEqual(parser.last_event_id, b"4")

    def test_an_id_in_a_block_without_data_is_forgotten_and_an_empty_id_clears_nothing(self) -> None:
        parser = SSEParser()
        parser.feed(b"id: 1\ndata: x\n\nid: 2\n\nid:\ndata: y\n\n")
        self.assertEqual(parser.last_event_id, b"1")

    def test_field_names_are_case_sensitive(self) -> None:
        self.assertEqual(SSEParser().feed(b"Data: x\n\n"), [])

    def test_incomplete_event_is_held_until_blank_line(self) -> None:
        parser = SSEParser()
        self.assertEqual(parser.feed(b"data: {\"a\""), [])
        self.assertEqual(parser.feed(b": 1}\n"), [])
        self.assertEqual([e.data for e in parser.feed(b"\n")], [b'{"a": 1}'])

    def test_a_leading_bom_is_not_stripped(self) -> None:
        self.assertEqual(SSEParser().feed(b"\xef\xbb\xbfdata: x\n\n"), [])

    def test_data_is_bytes_as_sent(self) -> None:
        self.assertEqual(SSEParser().feed(b"data: \xff\xfe\n\n")[0].data, b"\xff\xfe")

    def test_a_line_of_65535_bytes_passes(self) -> None:
        events = SSEParser().feed(b"data:" + b"x" * 65530 + b"\n\n")
        self.assertEqual(len(events[0].data), 65530)

    def test_a_longer_line_ends_the_stream_and_nothing_after_it_is_read(self) -> None:
        parser = SSEParser()
        events = feed_all(parser, b"data: a\n\ndata:", b"x" * 65531, b"\n\ndata: b\n\n")
        self.assertEqual([e.data for e in events], [b"a"])
        self.assertTrue(parser.overflow)
        self.assertEqual(parser.feed(b"data: c\n\n"), [])

    def test_an_unterminated_line_past_the_limit_ends_the_stream_without_buffering_it(self) -> None:
        parser = SSEParser()
        for _ in range(100):
            parser.feed(b"z" * 1000)
        self.assertTrue(parser.overflow)
        self.assertEqual(parser._buffer, b"")

    def test_an_event_whose_data_passes_the_limit_is_dispatched_as_too_large_without_its_data(self) -> None:
        parser = SSEParser(max_data=200)
        events = parser.feed((b"data: " + b"b" * 90 + b"\n") * 5 + b"\ndata: next\n\n")
        self.assertEqual([(e.too_large, e.data) for e in events], [(True, b""), (False, b"next")])

    def test_header_safe_ids(self) -> None:
        self.assertEqual(header_safe_id(b"evt-7"), "evt-7")
        self.assertEqual(header_safe_id("ü".encode()), "ü")
        for raw in (b"a\rb", b"a\x00", b"\xff", b"a\x7f"):
            self.assertEqual(header_safe_id(raw), "", raw)


# -- property tests ------------------------------------------------------

_text = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
_events = st.lists(
    st.tuples(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
        st.text(alphabet="0123456789abcdef-", min_size=1, max_size=10),
        st.lists(_text, min_size=1, max_size=3),
    ),
    max_size=8,
)
_line_end = st.sampled_from([b"\n", b"\r\n"])
# Garbage that is valid framing-wise but carries no event: comments, unknown
# fields, blank lines, lines of bytes without a colon.
_garbage = st.lists(
    st.one_of(
        st.binary(max_size=30).map(lambda b: b":" + b.replace(b"\n", b"")),
        st.binary(max_size=30).map(lambda b: b"x-" + b.replace(b"\n", b"").replace(b":", b"")),
        st.just(b"retry: nope"),
        st.just(b""),
    ),
    max_size=4,
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[ServerSentEvent]]:
    expected = []
    out = bytearray()
    for event_type, event_id, lines in draw(_events):
        eol = draw(_line_end)
        for junk in draw(_garbage):
            out += junk + eol
        out += eol  # ends any event the garbage began (it has no data)
        out += b"id: " + event_id.encode() + eol + b"event: " + event_type.encode() + eol
        for line in lines:
            # A CR ending the data would be taken as part of a CRLF.
            out += b"data: " + line + (b" " if line.endswith(b"\r") else b"") + eol
        out += eol
        data = b"\n".join(line + (b" " if line.endswith(b"\r") else b"") for line in lines)
        expected.append(ServerSentEvent(data=data, type=event_type.encode(), id=event_id.encode()))
    return bytes(out), expected


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


class SSEPropertyTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(streams(), st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
    def test_any_chunking_of_a_stream_with_garbage_yields_the_same_events(
        self, stream: tuple[bytes, list[ServerSentEvent]], cuts: list[int]
    ) -> None:
        data, expected = stream
        self.assertEqual(feed_all(SSEParser(), *chunked(data, cuts)), expected)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=200), max_size=30))
    def test_arbitrary_bytes_never_raise_and_stay_bounded(self, chunks: list[bytes]) -> None:
        parser = SSEParser(max_data=512)
        for chunk in chunks:
            for event in parser.feed(chunk):
                self.assertLessEqual(len(event.data), 512)
        self.assertLessEqual(len(parser._buffer), 65535)
        self.assertLessEqual(parser._size, 512 + 65536)

    @settings(max_examples=100, deadline=None)
    @given(streams(), st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
    def test_garbage_before_a_blank_line_does_not_hide_later_events(
        self, stream: tuple[bytes, list[ServerSentEvent]], junk: bytes, cuts: list[int]
    ) -> None:
        data, expected = stream
        # Whatever the junk does to the event it falls into, two blank lines
        # end it, and everything after is parsed as usual.
        prefix = junk.replace(b"\n", b"") + b"\n\n"
        events = feed_all(SSEParser(), *chunked(prefix + data, cuts))
        self.assertEqual(events[len(events) - len(expected):] if expected else [], expected)
