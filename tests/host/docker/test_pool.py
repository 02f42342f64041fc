"""
The Docker pool's pieces that need no daemon: error translation, the
bounded hand-over of tar bytes, the streaming base64 field decoder, and
the pool's lifecycle.
"""

from __future__ import annotations

import base64
import json

import docker.errors
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from plexagent import errors
from plexagent.host.docker.errors import translate
from plexagent.host.docker.pool import DockerPool
from plexagent.host.docker.watch import ContainerListCache
from plexagent.http.bodies import Base64Field
from plexagent.pipes import TarFeed


def api_error(status: int, explanation: str) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError("500 Server Error", response=response, explanation=explanation)


class Translate(unittest.TestCase):
    def test_not_found_is_404_with_dockers_message(self) -> None:
        e = translate(docker.errors.NotFound("x", explanation="No such container: web"), "container")
        self.assertIsInstance(e, errors.NotFound)
        self.assertEqual((e.message, e.details), ("container not found", "No such container: web"))

    def test_status_codes(self) -> None:
        for status, kind in ((409, errors.Conflict), (400, errors.InvalidInput), (404, errors.NotFound),
                             (401, errors.Forbidden), (500, errors.UpstreamFailed)):
            e = translate(api_error(status, "because"), "container")
            self.assertIsInstance(e, kind, status)
            self.assertEqual(e.details, "because")

    def test_connection_errors_are_docker_unavailable(self) -> None:
        for exc in (requests.exceptions.ConnectionError("refused"), ConnectionRefusedError(111, "refused"),
                    docker.errors.DockerException("Error while fetching server API version: refused")):
            e = translate(exc)
            self.assertIsInstance(e, errors.Unavailable)
            self.assertEqual(e.message, "docker unavailable")

    def test_secrets_are_blanked_from_details(self) -> None:
        e = translate(api_error(500, "login for user:hunter2 failed: unauthorized"), "registry", ("hunter2",))
        self.assertIsInstance(e, errors.Forbidden)
        self.assertNotIn("hunter2", json.dumps([e.message, e.details]))

    def test_dockers_refusals_are_the_clients_whatever_status_the_engine_gave(self) -> None:
        # Real answers of Docker 20.10: many refusals of a container's
        # parameters come as 500s.
        for status, explanation, kind, message in (
            (500, "unable to find user nosuchuser: no matching entries in passwd file", errors.InvalidInput,
             "docker refused the user"),
            (500, "unable to find group nosuchgroup: no matching entries in group file", errors.InvalidInput,
             "docker refused the user"),
            (500, "invalid mode: rw,bogus", errors.InvalidInput, "docker refused the volumes"),
            (500, "invalid volume specification: '/a:/:rw': invalid mount config for type \"bind\": "
                  "invalid specification: destination can't be '/'", errors.InvalidInput, "docker refused the volumes"),
            (500, "path /srv is mounted on / but it is not a shared mount", errors.InvalidInput,
             "docker refused the volumes"),
            (400, "Duplicate mount point: /x", errors.InvalidInput, "docker refused the volumes"),
            (400, "invalid restart policy 'bogus'", errors.InvalidInput, "docker refused the restart policy"),
            (400, "maximum retry count cannot be negative", errors.InvalidInput, "docker refused the restart policy"),
            (400, "Interval in Healthcheck cannot be less than 1ms", errors.InvalidInput,
             "docker refused the health check"),
            (400, 'invalid port specification: "99999"', errors.InvalidInput, "docker refused the ports"),
            (500, "driver failed programming external connectivity on endpoint web (0123): Bind for "
                  "0.0.0.0:8080 failed: port is already allocated", errors.Conflict, "a host port is already in use"),
            (500, "failed to create shim task: OCI runtime create failed: runc create failed: unable to start "
                  "container process: error during container init: sethostname: invalid argument: unknown",
             errors.InvalidInput, "docker could not start the container's process"),
            (400, "invalid reference format: repository name must be lowercase", errors.InvalidInput,
             "invalid image reference"),
            (400, "Minimum memory limit allowed is 6MB", errors.InvalidInput, "docker refused the parameters"),
            (404, "network app-net not found", errors.NotFound, "network not found"),
            (404, "No such container: web", errors.NotFound, "container not found"),
            (404, "No such image: app:v9", errors.NotFound, "image not found"),
            (409, "Conflict. The container name \"/web\" is already in use", errors.Conflict,
             "conflict with the container's or image's current state"),
            (500, "Get \"https://registry.example/v2/\": unauthorized: authentication required", errors.Forbidden,
             "the registry refused the credentials"),
            (500, "error creating overlay mount: no space left on device", errors.UpstreamFailed, "docker failed"),
        ):
            e = translate(api_error(status, explanation), "container")
            self.assertIsInstance(e, kind, explanation)
            self.assertEqual((e.message, e.details), (message, explanation))

    def test_a_500_from_an_image_operation_is_not_called_a_failed_pull(self) -> None:
        e = translate(api_error(500, "error creating overlay mount: no space left on device"), "image")
        self.assertEqual((type(e), e.message), (errors.UpstreamFailed, "docker failed"))

    def test_other_exceptions_are_left_alone(self) -> None:
        error = ValueError("bug")
        self.assertIs(translate(error), error)


class ImmediateReactor:
    def callFromThread(self, f, *args):  # type: ignore[no-untyped-def]
        f(*args)


class Feed(unittest.TestCase):
    def setUp(self) -> None:
        self.events: list[str] = []
        self.feed = TarFeed(ImmediateReactor(), lambda: self.events.append("pause"),
                            lambda: self.events.append("resume"), high_water=10, low_water=4)

    def test_pauses_above_high_water_and_resumes_below_low_water(self) -> None:
        for _ in range(4):
            self.feed.put(b"abcd")
        self.assertEqual(self.events, ["pause"])
        self.feed.close()
        chunks = self.feed.chunks()
        self.assertEqual(next(chunks), b"abcd")  # 12 left
        self.assertEqual(next(chunks), b"abcd")  # 8 left
        self.assertEqual(self.events, ["pause"])
        self.assertEqual(next(chunks), b"abcd")  # 4 left: below low water
        self.assertEqual(self.events, ["pause", "resume"])
        self.assertEqual(list(chunks), [b"abcd"])
        self.assertEqual(self.feed.total, 16)

    def test_abort_fails_the_worker_and_resumes_the_socket(self) -> None:
        for _ in range(4):
            self.feed.put(b"abcd")
        self.feed.abort()
        self.assertEqual(self.events, ["pause", "resume"])
        self.assertRaises(OSError, next, self.feed.chunks())
        self.feed.put(b"more")  # ignored after an abort


class Base64FieldDecoding(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=600), st.lists(st.integers(min_value=1, max_value=50), max_size=40), st.booleans())
    def test_any_chunking_decodes_the_value(self, data: bytes, cuts: list[int], escape: bool) -> None:
        body = json.dumps({"name": "x", "image_tar_b64": base64.b64encode(data).decode(), "z": 1})
        if escape:
            body = body.replace("/", "\\/")
        raw = body.encode()
        out: list[bytes] = []
        field = Base64Field("image_tar_b64", out.append)
        at = 0
        for cut in cuts:
            field.feed(raw[at:at + cut])
            at += cut
        field.feed(raw[at:])
        field.close()
        self.assertEqual(b"".join(out), data)

    def test_missing_field_or_bad_base64_is_invalid_input(self) -> None:
        field = Base64Field("image_tar_b64", lambda _: None)
        field.feed(b'{"other": "x"}')
        self.assertRaises(errors.InvalidInput, field.close)
        field = Base64Field("image_tar_b64", lambda _: None)
        self.assertRaises(errors.InvalidInput, field.feed, b'{"image_tar_b64": "@@@@"}')
        field = Base64Field("image_tar_b64", lambda _: None)
        self.assertRaises(errors.InvalidInput, field.feed, b'{"image_tar_b64": 5}')


class Lifecycle(unittest.TestCase):
    @defer.inlineCallbacks
    def test_the_pool_is_named_bounded_and_follows_the_service(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        pool = DockerPool(reactor, "unix:///nonexistent/docker.sock", threads=3)
        self.assertEqual((pool.threadpool.name, pool.threadpool.max), ("plexagent-docker", 3))
        self.assertFalse(pool.threadpool.started)
        pool.startService()
        self.assertTrue(pool.threadpool.started)
        yield pool.stopService()
        self.assertFalse(pool.threadpool.started)
        self.assertIsNone(pool.stopService())  # a second stop is harmless

    @defer.inlineCallbacks
    def test_calls_run_off_the_reactor_thread(self):  # type: ignore[no-untyped-def]
        import threading

        from twisted.internet import reactor

        pool = DockerPool(reactor, "", threads=1, client_factory=lambda: "client")
        pool.startService()
        self.addCleanup(pool.stopService)
        name = yield pool.call(lambda client: (client, threading.current_thread().name))
        self.assertEqual(name[0], "client")
        self.assertIn("plexagent-docker", name[1])

    async def test_stats_samples_never_take_a_thread_a_request_waits_for(self) -> None:
        import threading

        from twisted.internet import reactor

        pool = DockerPool(reactor, "", threads=2, client_factory=lambda: "client")
        self.assertEqual(pool.sampling_threads, 1)
        pool.startService()
        self.addCleanup(pool.stopService)
        release = threading.Event()
        self.addCleanup(release.set)
        # Samples waiting for Docker's collection hold every stats thread...
        held = [pool.sampling_call(lambda client: release.wait(30)) for _ in range(3)]
        # ...and both of the pool's threads still answer requests.
        names = await defer.gatherResults([pool.call(lambda client: threading.current_thread().name)
                                           for _ in range(2)])
        self.assertTrue(all("plexagent-docker" in name and "stats" not in name for name in names), names)
        release.set()
        self.assertEqual(await defer.gatherResults(held), [True, True, True])

    @defer.inlineCallbacks
    def test_a_connection_error_drops_the_client_so_the_next_call_reconnects(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        made: list[int] = []

        def factory() -> int:
            made.append(len(made))
            return made[-1]

        pool = DockerPool(reactor, "", threads=1, client_factory=factory)
        pool.startService()
        self.addCleanup(pool.stopService)

        def fail(client: int) -> None:
            raise requests.exceptions.ConnectionError("gone")

        yield self.assertFailure(pool.call(fail), errors.Unavailable)
        second = yield pool.call(lambda client: client)
        self.assertEqual((made, second), ([0, 1], 1))


class ContainerCacheInvalidation(unittest.TestCase):
    def cache(self) -> "ContainerListCache":
        from plexagent.host.docker.watch import ContainerListCache

        class NotRunning:
            running = False

        cache = ContainerListCache(NotRunning())  # type: ignore[arg-type]
        cache._cached = {
            "list": (0, 0.0, []),
            ("inspect", "web"): (0, 0.0, {"Id": "aaa"}),
            ("inspect", "db"): (0, 0.0, {"Id": "bbb"}),
        }
        return cache

    def test_an_event_clears_the_list_and_that_containers_entries_only(self) -> None:
        cache = self.cache()
        cache.invalidate({"Type": "container", "Action": "die", "Actor": {"ID": "aaa", "Attributes": {}}})
        self.assertEqual(list(cache._cached), [("inspect", "db")])

    def test_a_change_without_an_event_clears_everything_and_wakes_waiters(self) -> None:
        cache = self.cache()
        changed = cache.changed()
        cache.invalidate()
        self.assertEqual(cache._cached, {})
        self.assertTrue(changed.called)
