"""/upload/tar, /upload/tar/stream and /upload/tar/chunked on a real listener."""

from __future__ import annotations

import base64
import io
import os
import tarfile
import threading
import zlib
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from plexagent import errors
from plexagent.agentapi.uploads import MAX_CONCURRENT_EXTRACTIONS
from plexagent.host.files import chunks, tarsafe
from plexagent.host.files.chunks import ChunkStore, ChunkWriter
from plexagent.http.bodies import UploadInterrupted
from plexagent.pipes import PIPE_HIGH_WATER, BodyPipe
from tests.agentapi.support import API_KEY, RunningAgentAPI, tree
from tests.host.files.test_tarsafe import archive, member

SITE = archive(member("index.html", data=b"<h1>hi</h1>"), member("css/site.css", data=b"body{}"))


def bomb(size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    return zlib.compress(buf.getvalue(), 9, wbits=31)


class StreamTests(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = RunningAgentAPI(self, max_upload_bytes=4 << 20, max_archive_members=50)

    async def stream(self, data: bytes, **params: str):
        return await self.agent.call("POST", "/upload/tar/stream", data=data, params=params,
                                     headers={"Content-Type": "application/gzip"})

    async def test_stream_extracts_and_reports(self) -> None:
        target = self.agent.p("site")
        code, body = await self.stream(SITE, extract_path=target)
        self.assertEqual(code, 200)
        self.assertEqual((body["files"], body["bytes"], body["skipped"], body["path"]), (2, 17, [], target))
        self.assertEqual(tree(target), {"index.html": b"<h1>hi</h1>", "css": "dir", "css/site.css": b"body{}"})

    async def test_large_stream_goes_through_the_paused_pipe(self) -> None:
        payload = os.urandom(3 << 20)
        code, body = await self.stream(archive(member("blob", data=payload), compress=False)[: (3 << 20) + 3072],
                                       extract_path=self.agent.p("big"))
        self.assertEqual((code, body["bytes"]), (200, 3 << 20))
        with open(self.agent.p("big", "blob"), "rb") as f:
            self.assertEqual(f.read(), payload)

    async def test_a_slow_extraction_pauses_the_connection_and_bounds_the_buffer(self) -> None:
        release = threading.Event()

        def slow_extract(raw, policy, extract_path, limits, max_input=None, journal=None):
            release.wait(30)  # a safety bound only: the test sets it
            total = 0
            while True:
                piece = raw.read(1 << 20)
                if not piece:
                    return tarsafe.ExtractionResult(path=extract_path, bytes=total)
                total += len(piece)

        self.patch(tarsafe, "extract", slow_extract)
        factory = self.agent.context.streaming_factory(b"POST", b"/upload/tar/stream")
        paused: defer.Deferred = defer.Deferred()
        most = [0]

        def observed(request, length):
            sink = factory(request, length)
            pipe = sink.pipe
            pause, write = pipe._pause, pipe.write

            def pause_and_tell() -> None:
                pause()
                if not paused.called:
                    paused.callback(None)

            def write_and_measure(data: bytes) -> None:
                write(data)
                most[0] = max(most[0], pipe._size)

            pipe._pause = pause_and_tell
            pipe.write = write_and_measure
            return sink

        self.agent.context.stream_body(b"POST", b"/upload/tar/stream", observed)
        body = os.urandom(1 << 20) * 32
        response = defer.ensureDeferred(self.stream(body, extract_path=self.agent.p("slow")))
        await paused
        release.set()
        code, result = await response
        self.assertEqual((code, result["bytes"]), (200, len(body)))
        self.assertLess(most[0], PIPE_HIGH_WATER + (1 << 20))

    async def test_extractions_beyond_the_cap_are_503_and_slots_are_released(self) -> None:
        release = threading.Event()
        started: list[defer.Deferred] = [defer.Deferred() for _ in range(MAX_CONCURRENT_EXTRACTIONS)]

        def blocked_extract(raw, policy, extract_path, limits, max_input=None, journal=None):
            index = int(extract_path.rsplit("-", 1)[1])
            reactor.callFromThread(started[index].callback, None)
            release.wait(30)  # a safety bound only: the test sets it
            while raw.read(1 << 20):
                pass
            return tarsafe.ExtractionResult(path=extract_path)

        self.patch(tarsafe, "extract", blocked_extract)
        running = [defer.ensureDeferred(self.stream(SITE, extract_path=self.agent.p(f"slot-{i}")))
                   for i in range(MAX_CONCURRENT_EXTRACTIONS)]
        await defer.gatherResults(started)
        code, body = await self.stream(SITE, extract_path=self.agent.p("one-too-many"))
        self.assertEqual((code, body["error"]), (503, "too many uploads in progress"))
        release.set()
        self.assertEqual([code for code, _ in await defer.gatherResults(running)], [200] * MAX_CONCURRENT_EXTRACTIONS)
        self.patch(tarsafe, "extract", lambda raw, policy, path, *a: tarsafe.ExtractionResult(path=path))
        code, _ = await self.stream(SITE, extract_path=self.agent.p("after"))
        self.assertEqual(code, 200)

    async def test_hostile_members_are_skipped_and_reported(self) -> None:
        data = archive(
            member("../escape", data=b"x"),
            member("/abs", data=b"x"),
            member("link", tarfile.SYMTYPE, linkname=self.agent.outside),
            member("dev", tarfile.CHRTYPE),
            member("ok", data=b"ok"),
        )
        code, body = await self.stream(data, extract_path=self.agent.p("t"))
        self.assertEqual(code, 200)
        self.assertEqual({s["name"] for s in body["skipped"]}, {"../escape", "/abs", "link", "dev"})
        self.assertEqual(body["files"], 1)
        self.assertEqual(os.listdir(self.agent.outside), [])

    async def test_missing_extract_path_is_400(self) -> None:
        code, body = await self.stream(SITE)
        self.assertEqual((code, body["error"]), (400, "extract_path is required"))

    async def test_non_ascii_extract_path_is_extracted_into(self) -> None:
        target = self.agent.p("caf\u00e9")
        code, body = await self.stream(SITE, extract_path=target)
        self.assertEqual((code, body["path"]), (200, target))
        self.assertEqual(tree(target)["index.html"], b"<h1>hi</h1>")

    async def test_extract_path_that_is_not_utf8_is_400(self) -> None:
        code, body = await self.agent.call("POST", "/upload/tar/stream?extract_path=%FF", data=SITE,
                                           headers={"Content-Type": "application/gzip"})
        self.assertEqual((code, body["error"]), (400, "invalid query parameter"))

    async def test_forbidden_extract_path_is_403_and_creates_nothing(self) -> None:
        target = os.path.join(self.agent.outside, "x")
        code, body = await self.stream(SITE, extract_path=target)
        self.assertEqual((code, body), (403, {"error": "path not allowed", "details": target}))
        self.assertEqual(os.listdir(self.agent.outside), [])

    async def test_gzip_bomb_is_413_and_partial_extraction_is_removed(self) -> None:
        data = bomb(64 << 20)
        self.assertLess(len(data), 1 << 20)
        code, body = await self.stream(data, extract_path=self.agent.p("bomb"))
        self.assertEqual((code, body["error"]), (413, "archive too large"))
        self.assertEqual(os.listdir(self.agent.root), [])

    async def test_too_many_members_is_413(self) -> None:
        data = archive(*[member(f"f{i}") for i in range(60)])
        code, body = await self.stream(data, extract_path=self.agent.p("many"))
        self.assertEqual((code, body["error"]), (413, "too many archive members"))
        self.assertEqual(os.listdir(self.agent.root), [])

    async def test_garbage_body_is_400_invalid_archive(self) -> None:
        code, body = await self.stream(b"not a tarball at all" * 100, extract_path=self.agent.p("g"))
        self.assertEqual((code, body["error"]), (400, "invalid archive"))
        self.assertEqual(os.listdir(self.agent.root), [])

    async def test_client_disconnecting_mid_body_leaves_nothing(self) -> None:
        factory = self.agent.context.streaming_factory(b"POST", b"/upload/tar/stream")
        got_data: defer.Deferred = defer.Deferred()

        def observed(request, length):
            sink = factory(request, length)
            write = sink.write

            def first_write(data: bytes) -> None:
                write(data)
                if not got_data.called:
                    got_data.callback(sink)

            sink.write = first_write
            return sink

        self.agent.context.stream_body(b"POST", b"/upload/tar/stream", observed)
        data = archive(member("first", data=b"complete member"), member("second", data=os.urandom(200_000)))
        target = self.agent.p("cut")
        head = (f"POST /upload/tar/stream?extract_path={target} HTTP/1.1\r\nHost: x\r\n"
                f"X-API-Key: {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n").encode()
        client = protocol.Protocol()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.agent.port.getHost().port), client)
        client.transport.write(head + data[: len(data) * 2 // 3])
        sink = await got_data
        client.transport.loseConnection()
        await self.assertFailure(sink.done, UploadInterrupted)
        self.assertEqual(os.listdir(self.agent.root), [])

    async def test_unauthenticated_upload_extracts_nothing(self) -> None:
        code, _ = await self.agent.call("POST", "/upload/tar/stream", key="wrong", data=SITE,
                                        params={"extract_path": self.agent.p("s")})
        self.assertEqual(code, 401)
        self.assertEqual(os.listdir(self.agent.root), [])


class TarTests(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = RunningAgentAPI(self, max_upload_bytes=4 << 20)

    async def test_multipart_tar_file_is_extracted(self) -> None:
        target = self.agent.p("site")
        code, body = await self.agent.call(
            "POST", "/upload/tar", params={"extract_path": target},
            files={"tar_file": ("site.tar.gz", "application/gzip", io.BytesIO(SITE))},
        )
        self.assertEqual((code, body["files"], body["path"]), (200, 2, target))
        self.assertEqual(tree(target)["index.html"], b"<h1>hi</h1>")

    async def test_multipart_extract_path_may_be_a_form_field(self) -> None:
        target = self.agent.p("from-form")
        code, body = await self.agent.call(
            "POST", "/upload/tar",
            data={"extract_path": target},
            files={"tar_file": ("site.tar.gz", "application/gzip", io.BytesIO(SITE))},
        )
        self.assertEqual((code, body["path"]), (200, target))

    async def test_multipart_form_field_outside_allowed_paths_is_403(self) -> None:
        target = os.path.join(self.agent.outside, "t")
        code, body = await self.agent.call(
            "POST", "/upload/tar", data={"extract_path": target},
            files={"tar_file": ("site.tar.gz", "application/gzip", io.BytesIO(SITE))},
        )
        self.assertEqual((code, body["error"]), (403, "path not allowed"))
        self.assertEqual(os.listdir(self.agent.outside), [])

    async def test_legacy_json_over_its_limit_is_413(self) -> None:
        agent = RunningAgentAPI(self, max_json_bytes=1000)
        code, body = await agent.post_json("/upload/tar", {"data": "A" * 2000}, params={"extract_path": agent.p("x")})
        self.assertEqual(code, 413)
        self.assertEqual(os.listdir(agent.root), [])

    async def test_multipart_without_tar_file_is_400(self) -> None:
        code, body = await self.agent.call(
            "POST", "/upload/tar", params={"extract_path": self.agent.p("s")},
            files={"other": ("x.tgz", "application/gzip", io.BytesIO(SITE))},
        )
        self.assertEqual((code, body["error"]), (400, "tar_file is required"))
        self.assertEqual(os.listdir(self.agent.root), [])

    async def test_legacy_json_base64_is_extracted(self) -> None:
        target = self.agent.p("legacy")
        code, body = await self.agent.post_json(
            "/upload/tar", {"data": base64.b64encode(SITE).decode()}, params={"extract_path": target}
        )
        self.assertEqual((code, body["files"]), (200, 2))
        self.assertTrue(os.path.isfile(os.path.join(target, "css", "site.css")))

    async def test_legacy_json_forbidden_path_is_403(self) -> None:
        code, _ = await self.agent.post_json(
            "/upload/tar", {"data": base64.b64encode(SITE).decode()}, params={"extract_path": "/etc/x"}
        )
        self.assertEqual(code, 403)


class ChunkedTests(unittest.TestCase):
    def setUp(self) -> None:
        self.agent = RunningAgentAPI(self, max_upload_bytes=4 << 20)
        payload = archive(member("a.bin", data=os.urandom(100_000)), member("b.txt", data=b"b"))
        size = len(payload) // 3 + 1
        self.pieces = [payload[i:i + size] for i in range(0, len(payload), size)]
        self.assertEqual(len(self.pieces), 3)

    async def send(self, index: int, chunk_id: str = "up-1", total: int = 3, **extra: str):
        params = {"chunk_id": chunk_id, "chunk_index": str(index), "total_chunks": str(total), **extra}
        return await self.agent.call("POST", "/upload/tar/chunked", data=self.pieces[index], params=params)

    async def test_non_ascii_chunk_id_is_400_invalid_chunk_id(self) -> None:
        code, body = await self.send(0, chunk_id="\u0080")
        self.assertEqual((code, body["error"]), (400, "invalid chunk_id"))

    async def test_chunks_in_any_order_with_resend_are_assembled(self) -> None:
        target = self.agent.p("chunked")
        code, body = await self.send(2)
        self.assertEqual((code, body["received"], body["complete"]), (200, [2], False))
        code, body = await self.send(2)  # idempotent re-send
        self.assertEqual(body["received"], [2])
        code, body = await self.agent.get("/upload/tar/chunked", chunk_id="up-1")
        self.assertEqual((code, body["received"], body["missing"]), (200, [2], [0, 1]))
        await self.send(0)
        code, body = await self.send(1, extract_path=target)
        self.assertEqual((code, body["complete"], body["extracted"], body["files"], body["path"]), (200, True, True, 2, target))
        self.assertEqual(tree(target)["b.txt"], b"b")
        code, _ = await self.agent.get("/upload/tar/chunked", chunk_id="up-1")
        self.assertEqual(code, 404)
        self.assertEqual(os.listdir(os.path.join(self.agent.data_dir, "uploads")), [])

    async def test_chunks_sent_in_parallel_are_all_held(self) -> None:
        results = await defer.gatherResults([defer.ensureDeferred(self.send(i)) for i in range(3)])
        self.assertEqual(sorted(code for code, _ in results), [200, 200, 200])
        code, body = await self.agent.get("/upload/tar/chunked", chunk_id="up-1")
        self.assertEqual((body["received"], body["complete"]), ([0, 1, 2], True))

    async def test_completion_without_extract_path_waits_for_it(self) -> None:
        for i in range(3):
            code, body = await self.send(i)
        self.assertEqual((body["complete"], body["extracted"]), (True, False))
        code, body = await self.send(2, extract_path=self.agent.p("late"))
        self.assertEqual((code, body["extracted"]), (200, True))

    async def test_total_chunks_mismatch_is_409(self) -> None:
        await self.send(0)
        code, body = await self.send(1, total=4)
        self.assertEqual((code, body["error"]), (409, "total_chunks does not match the upload"))

    async def test_invalid_parameters_are_400_and_store_nothing(self) -> None:
        for params in ({"chunk_id": "../x", "chunk_index": "0", "total_chunks": "1"},
                       {"chunk_id": "a", "chunk_index": "3", "total_chunks": "3"},
                       {"chunk_id": "a", "chunk_index": "x", "total_chunks": "3"}):
            code, _ = await self.agent.call("POST", "/upload/tar/chunked", data=b"x", params=params)
            self.assertEqual(code, 400)
        self.assertEqual(os.listdir(os.path.join(self.agent.data_dir, "uploads")) if os.path.exists(
            os.path.join(self.agent.data_dir, "uploads")) else [], [])

    async def test_forbidden_extract_path_is_403_and_chunk_not_held(self) -> None:
        code, _ = await self.send(0, extract_path="/etc/x")
        self.assertEqual(code, 403)
        code, _ = await self.agent.get("/upload/tar/chunked", chunk_id="up-1")
        self.assertEqual(code, 404)

    async def test_chunks_over_the_upload_limit_are_413_and_not_held(self) -> None:
        agent = RunningAgentAPI(self, max_upload_bytes=1000)
        params = {"chunk_id": "big", "total_chunks": "2"}
        code, _ = await agent.call("POST", "/upload/tar/chunked", data=b"x" * 2000, params={**params, "chunk_index": "0"})
        self.assertEqual(code, 413)
        code, _ = await agent.call("POST", "/upload/tar/chunked", data=b"x" * 600, params={**params, "chunk_index": "0"})
        self.assertEqual(code, 200)
        code, body = await agent.call("POST", "/upload/tar/chunked", data=b"x" * 600, params={**params, "chunk_index": "1"})
        self.assertEqual((code, body["error"]), (413, "upload too large"))
        code, body = await agent.get("/upload/tar/chunked", chunk_id="big")
        self.assertEqual((body["received"], body["bytes"]), ([0], 600))
        leftovers = [n for n in os.listdir(os.path.join(agent.data_dir, "uploads", "big")) if n.startswith(".incoming")]
        self.assertEqual(leftovers, [])

    async def test_unknown_upload_status_is_404(self) -> None:
        code, body = await self.agent.get("/upload/tar/chunked", chunk_id="nothing")
        self.assertEqual((code, body["error"]), (404, "upload not found"))


    async def test_an_upload_with_unloadable_metadata_is_set_aside_and_can_start_over(self) -> None:
        await self.send(0)
        uploads = os.path.join(self.agent.data_dir, "uploads")
        with open(os.path.join(uploads, "up-1", "meta.json"), "wb") as f:
            f.write(b'{"total_chunks": 1e400}')
        code, body = await self.agent.get("/upload/tar/chunked", chunk_id="up-1")
        self.assertEqual((code, body["error"]), (404, "upload not found"))
        [aside] = os.listdir(uploads)
        self.assertTrue(aside.startswith("up-1.quarantined-"))
        # What was set aside cannot be addressed; the id itself starts over.
        code, body = await self.agent.get("/upload/tar/chunked", chunk_id=aside)
        self.assertEqual((code, body["error"]), (400, "invalid chunk_id"))
        for i in range(3):
            code, body = await self.send(i, extract_path=self.agent.p("again"))
        self.assertEqual((code, body["extracted"]), (200, True))



class ChunkGarbageTests(unittest.TestCase):
    def test_abandoned_uploads_are_removed_after_max_age(self) -> None:
        now = [1_000_000.0]
        directory = os.path.realpath(self.mktemp())
        store = ChunkStore(directory, 1 << 20, max_age=3600, clock=lambda: now[0])
        for chunk_id, age in (("old", 7200), ("fresh", 60)):
            os.makedirs(os.path.join(directory, chunk_id))
            with open(os.path.join(directory, chunk_id, "chunk-000000"), "w") as f:
                f.write("x")
            for path in (os.path.join(directory, chunk_id), os.path.join(directory, chunk_id, "chunk-000000")):
                os.utime(path, (now[0] - age, now[0] - age))
        self.assertEqual(store.collect_garbage(), ["old"])
        self.assertEqual(os.listdir(directory), ["fresh"])


class FakeReactor:
    def callFromThread(self, f, *args):
        f(*args)


class BodyPipeTests(unittest.TestCase):
    def test_writer_is_paused_past_high_water_and_resumed_below_low_water(self) -> None:
        events = []
        pipe = BodyPipe(FakeReactor(), lambda: events.append("pause"), lambda: events.append("resume"), high=10, low=5)
        pipe.write(b"x" * 8)
        self.assertEqual(events, [])
        pipe.write(b"x" * 8)
        self.assertEqual(events, ["pause"])
        self.assertEqual(pipe.read(8), b"x" * 8)
        self.assertEqual(events, ["pause"])  # 8 buffered: not below 5 yet
        self.assertEqual(pipe.read(4), b"xxxx")
        self.assertEqual(events, ["pause", "resume"])

    def test_abort_fails_the_reader(self) -> None:
        from plexagent.http.bodies import UploadInterrupted

        pipe = BodyPipe(FakeReactor(), lambda: None, lambda: None)
        pipe.write(b"abc")
        pipe.abort(UploadInterrupted("upload interrupted"))
        self.assertRaises(UploadInterrupted, pipe.read, 10)

    def test_finish_gives_eof_after_the_data(self) -> None:
        pipe = BodyPipe(FakeReactor(), lambda: None, lambda: None)
        pipe.write(b"abc")
        pipe.finish()
        self.assertEqual((pipe.read(10), pipe.read(10)), (b"abc", b""))

    def garbage_store(self) -> tuple[ChunkStore, str]:
        directory = os.path.realpath(self.mktemp())
        os.makedirs(directory)
        return ChunkStore(directory, 1 << 20, max_age=3600), directory

    def upload(self, directory: str, chunk_id: str, meta: bytes) -> None:
        os.makedirs(os.path.join(directory, chunk_id))
        with open(os.path.join(directory, chunk_id, "chunk-000000"), "w") as f:
            f.write("x")
        with open(os.path.join(directory, chunk_id, "meta.json"), "wb") as f:
            f.write(meta)

    def test_uploads_whose_metadata_cannot_be_loaded_are_set_aside_never_removed(self) -> None:
        store, directory = self.garbage_store()
        self.upload(directory, "good", b'{"total_chunks": 2}')
        bad = {"torn": b'{"total_chunks": ', "nan": b'{"total_chunks": NaN}', "huge": b'{"total_chunks": 1000000000}',
               "type": b'{"total_chunks": "2"}', "path": b'{"total_chunks": 2, "extract_path": 5}',
               "surrogate": b'{"total_chunks": 2, "extract_path": "/tmp/\\udc80"}', "list": b"[2]"}
        for chunk_id, meta in bad.items():
            self.upload(directory, chunk_id, meta)
        self.assertEqual(store.collect_garbage(), [])
        names = sorted(os.listdir(directory))
        self.assertEqual([n for n in names if ".quarantined-" not in n], ["good"])
        self.assertEqual(sorted(n.split(".quarantined-")[0] for n in names if ".quarantined-" in n), sorted(bad))
        # Set aside is never collected, however old.
        store.clock = lambda: 1e12
        store.collect_garbage()
        self.assertEqual(len(os.listdir(directory)), len(bad))

    def test_an_uploads_directory_that_is_a_file_is_set_aside(self) -> None:
        directory = os.path.realpath(self.mktemp())
        with open(directory, "w") as f:
            f.write("x")
        store = ChunkStore(directory, 1 << 20, max_age=3600)
        self.assertEqual(store.collect_garbage(), [])
        self.assertFalse(os.path.exists(directory))
        self.assertEqual(len([n for n in os.listdir(os.path.dirname(directory)) if ".quarantined-" in n]), 1)


class ChunkStoreBoundsTests(unittest.TestCase):
    """What chunked uploads may hold together, and what one more chunk costs."""

    def store(self, **kwargs: Any) -> ChunkStore:
        directory = os.path.realpath(self.mktemp())
        os.makedirs(directory)
        return ChunkStore(directory, kwargs.pop("max_total_bytes", 1 << 20), max_age=3600, **kwargs)

    def send(self, store: ChunkStore, chunk_id: str, index: int, total: int, data: bytes) -> Any:
        writer = ChunkWriter(store, chunk_id, index, total, 1 << 20)
        writer.write(data)
        return store.accept(writer, None)

    def test_uploads_past_max_uploads_are_refused(self) -> None:
        store = self.store(max_uploads=2)
        self.send(store, "a", 0, 2, b"x")
        self.send(store, "b", 0, 2, b"x")
        e = self.assertRaises(errors.Conflict, self.send, store, "c", 0, 2, b"x")
        self.assertEqual(e.message, "too many chunked uploads")
        self.send(store, "a", 1, 2, b"x")  # the uploads held go on
        store.remove("a")
        self.send(store, "c", 0, 2, b"x")

    def test_all_uploads_together_hold_at_most_the_upload_limit(self) -> None:
        store = self.store(max_total_bytes=1000)
        self.send(store, "a", 0, 2, b"x" * 600)
        e = self.assertRaises(errors.TooLarge, self.send, store, "b", 0, 2, b"x" * 600)
        self.assertEqual(e.message, "chunked uploads too large")
        self.assertEqual(os.listdir(os.path.join(store.directory, "b")), [])
        self.send(store, "b", 0, 2, b"x" * 400)

    def test_a_chunk_resent_replaces_its_size_rather_than_adding_it(self) -> None:
        store = self.store(max_total_bytes=1000)
        for _ in range(5):
            status = self.send(store, "a", 0, 2, b"x" * 600)
        self.assertEqual((status.received, status.bytes), ((0,), 600))

    def test_what_is_held_is_read_from_disk_once_then_kept_current(self) -> None:
        store = self.store(max_total_bytes=10_000)
        self.send(store, "a", 0, 100, b"x")
        scan = chunks._scan
        calls: list[str] = []
        self.patch(chunks, "_scan", lambda directory: calls.append(directory) or scan(directory))
        for index in range(1, 50):
            status = self.send(store, "a", index, 100, b"x" * 10)
        self.assertEqual(calls, [])  # no listing of the upload per chunk
        self.assertEqual((len(status.received), status.bytes), (50, 1 + 49 * 10))
        # A restart reads each upload once.
        fresh = ChunkStore(store.directory, 10_000, max_age=3600)
        self.assertEqual(fresh.status("a").bytes, 491)
        self.assertEqual(len(calls), 1)
