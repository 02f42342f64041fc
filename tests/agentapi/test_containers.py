"""
Container Management and /ping of the Node Agent API, against the real
test Docker daemon, through a real agent listening on loopback.
"""

from __future__ import annotations

import os
from typing import Any

import docker.errors
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from plexagent.testing import docker as td

LOOP = 'i=0; while true; do echo "line $i"; i=$((i+1)); sleep 0.1; done'


class ContainerRoutes(unittest.TestCase):
    """Each test gets its own agent and uniquely named containers."""

    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)

    def name(self) -> str:
        return td.unique_name(self, self.docker)

    async def run_container(self, **body: Any) -> dict[str, Any]:
        body.setdefault("name", self.name())
        body.setdefault("image", td.base_image())
        body.setdefault("command", ["sleep", "300"])
        status, doc = await self.api.post("/containers/run", body)
        self.assertEqual(status, 201, doc)
        return doc

    # -- /ping --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_ping_is_public_and_reports_docker(self) -> Any:
        status, doc = yield self.api.get("/ping", key=None)
        self.assertEqual((status, doc["status"], doc["docker"]), (200, "ok", True))
        self.assertIn("version", doc)

    # -- run --------------------------------------------------------------

    async def _run_with_seed_body(self) -> None:
        volume_dir = os.path.join(self.agent.workdir, "volume")
        os.makedirs(volume_dir)
        volume = f"pa-test-vol-{os.urandom(4).hex()}"
        # Registered before the container's cleanup, so it runs after it.
        self.addCleanup(self._remove_volume, volume)
        name = self.name()
        doc = await self.run_container(
            name=name,
            ports=["127.0.0.1:0:80", "0:53/udp"],
            environment=["DEBUG=1", "NODE_ENV=prod"],
            volumes=[f"{volume_dir}:/app/data", f"{volume}:/cache:ro"],
            restart_policy="unless-stopped",
            health_check={"test": "true", "interval": 30, "timeout": 10, "retries": 3},
        )
        self.assertEqual((doc["name"], doc["state"]), (name, "running"))
        info = self.docker.api.inspect_container(name)
        self.assertIn("DEBUG=1", info["Config"]["Env"])
        self.assertEqual(info["HostConfig"]["RestartPolicy"]["Name"], "unless-stopped")
        self.assertEqual(info["Config"]["Healthcheck"]["Test"], ["CMD-SHELL", "true"])
        self.assertEqual(info["Config"]["Healthcheck"]["Interval"], 30_000_000_000)
        binds = sorted(info["HostConfig"]["Binds"])
        self.assertIn(f"{os.path.realpath(volume_dir)}:/app/data:rw", binds)
        self.assertEqual(set(info["HostConfig"]["PortBindings"]), {"80/tcp", "53/udp"})

    def _remove_volume(self, name: str) -> None:
        try:
            self.docker.api.remove_volume(name, force=True)
        except docker.errors.NotFound:
            pass

    def test_run_accepts_the_seed_body(self) -> Any:
        return defer.ensureDeferred(self._run_with_seed_body())

    async def _run_with_object_variants(self) -> None:
        name = self.name()
        await self.run_container(
            name=name,
            ports={"0": 8080},  # {host: container}; 0 = any free host port
            environment={"A": "1", "B": True},
            command="sleep 300",
            health_check={"test": ["true"]},
        )
        info = self.docker.api.inspect_container(name)
        self.assertIn("A=1", info["Config"]["Env"])
        self.assertIn("B=true", info["Config"]["Env"])
        self.assertEqual(info["Config"]["Cmd"], ["sleep", "300"])
        self.assertEqual(info["Config"]["Healthcheck"]["Test"], ["CMD", "true"])
        self.assertIn("8080/tcp", info["HostConfig"]["PortBindings"])

    def test_run_accepts_object_forms_and_a_command_string(self) -> Any:
        return defer.ensureDeferred(self._run_with_object_variants())

    async def _run_conflict(self) -> None:
        doc = await self.run_container()
        status, err = await self.api.post(
            "/containers/run", {"name": doc["name"], "image": td.base_image(), "command": ["true"]}
        )
        self.assertEqual(status, 409)
        self.assertIn("already in use", err["details"])

    def test_run_with_a_name_in_use_is_409(self) -> Any:
        return defer.ensureDeferred(self._run_conflict())

    async def _run_missing_image(self) -> None:
        status, err = await self.api.post(
            "/containers/run", {"name": self.name(), "image": "pa-test-no-such-image:never"}
        )
        # The daemon cannot reach any registry: not found, or unavailable
        # upstream; never a 2xx, never a traceback.
        self.assertIn(status, (404, 500))
        self.assertIn("details", err)

    def test_run_with_an_unknown_image_is_an_error_with_details(self) -> Any:
        return defer.ensureDeferred(self._run_missing_image())

    async def _run_volume_outside(self) -> None:
        name = self.name()
        status, err = await self.api.post(
            "/containers/run",
            {"name": name, "image": td.base_image(), "volumes": ["/etc:/host-etc"]},
        )
        self.assertEqual((status, err["error"]), (403, "path not allowed"))
        self.assertEqual(self.docker.containers.list(all=True, filters={"name": name}), [])

    def test_run_with_a_volume_outside_allowed_paths_is_403_and_creates_nothing(self) -> Any:
        return defer.ensureDeferred(self._run_volume_outside())

    async def _run_volume_symlink(self) -> None:
        link = os.path.join(self.agent.workdir, "escape")
        os.symlink("/etc", link)
        status, err = await self.api.post(
            "/containers/run",
            {"name": self.name(), "image": td.base_image(), "volumes": [f"{link}:/x", ]},
        )
        self.assertEqual(status, 403)
        status, err = await self.api.post(
            "/containers/run",
            {"name": self.name(), "image": td.base_image(), "volumes": [f"{self.agent.workdir}/../../etc:/x"]},
        )
        self.assertEqual(status, 403)

    def test_run_with_a_volume_escaping_by_symlink_or_dotdot_is_403(self) -> Any:
        return defer.ensureDeferred(self._run_volume_symlink())

    async def _run_bad_input(self) -> None:
        cases = [
            {"image": td.base_image(), "ports": ["70000:80"]},
            {"image": td.base_image(), "ports": "80"},
            {"image": td.base_image(), "environment": ["NOEQUALS"]},
            {"image": td.base_image(), "restart_policy": "sometimes"},
            {"image": td.base_image(), "health_check": {"test": 5}},
            {"image": td.base_image(), "name": "bad name!"},
            {"name": self.name()},
        ]
        for body in cases:
            status, err = await self.api.post("/containers/run", body)
            self.assertEqual(status, 400, (body, err))
            self.assertIn("details", err)
        status, err = await self.api.post("/containers/run", data=b"{not json", headers={"Content-Type": "application/json"})
        self.assertEqual((status, err["error"]), (400, "invalid JSON body"))

    def test_run_with_malformed_fields_is_400_naming_the_field(self) -> Any:
        return defer.ensureDeferred(self._run_bad_input())

    async def _docker_rejects_parameters(self) -> None:
        status, err = await self.api.post(
            "/containers/run", {"name": self.name(), "image": td.base_image(), "network": "pa-test-no-such-net"}
        )
        self.assertEqual(status, 404, err)
        self.assertIn("pa-test-no-such-net", err["details"])

    def test_run_on_an_unknown_network_is_404_with_dockers_message(self) -> Any:
        return defer.ensureDeferred(self._docker_rejects_parameters())

    # -- list, status, lifecycle ---------------------------------------------

    async def _list(self) -> None:
        doc = await self.run_container()
        status, listing = await self.api.get("/containers")
        self.assertEqual(status, 200)
        mine = [c for c in listing["containers"] if c["ID"] == doc["id"]]
        self.assertEqual(len(mine), 1)
        self.assertEqual(mine[0]["Names"], "/" + doc["name"])
        self.assertEqual(mine[0]["Image"], td.base_image())
        self.assertTrue(mine[0]["Status"].startswith("Up"))

    def test_list_has_the_seed_keys(self) -> Any:
        return defer.ensureDeferred(self._list())

    async def _list_sees_outside_changes(self) -> None:
        cache = self.agent.top.agent.agent_services["docker"].container_list
        await self.api.get("/containers")
        if not cache.live:
            await cache.changed()  # the event watch has connected
        status, before = await self.api.get("/containers")
        name = self.name()
        changed = cache.changed()
        # Created behind the agent's back, as with the docker CLI.
        self.docker.containers.create(td.base_image(), ["true"], name=name)
        await changed
        status, after = await self.api.get("/containers")
        self.assertNotIn("/" + name, [c["Names"] for c in before["containers"]])
        self.assertIn("/" + name, [c["Names"] for c in after["containers"]])

    def test_list_shows_containers_changed_outside_the_agent_once_docker_reports_them(self) -> Any:
        return defer.ensureDeferred(self._list_sees_outside_changes())

    async def _status_sees_outside_changes(self) -> None:
        cache = self.agent.top.agent.agent_services["docker"].container_list
        doc = await self.run_container()
        status, st = await self.api.get(f"/containers/{doc['name']}/status")
        if not cache.live:
            await cache.changed()
        status, st = await self.api.get(f"/containers/{doc['name']}/status")
        self.assertEqual(st["state"], "running")
        changed = cache.changed()
        self.docker.api.kill(doc["name"])  # behind the agent's back
        await changed
        status, st = await self.api.get(f"/containers/{doc['name']}/status")
        self.assertNotEqual(st["state"], "running")

    def test_status_shows_changes_made_outside_the_agent_once_docker_reports_them(self) -> Any:
        return defer.ensureDeferred(self._status_sees_outside_changes())

    async def _lifecycle(self) -> None:
        doc = await self.run_container(command=["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"])
        name = doc["name"]
        status, st = await self.api.get(f"/containers/{name}/status")
        self.assertEqual(status, 200)
        self.assertEqual(set(st), {"id", "name", "state", "status", "health_status"})
        self.assertEqual((st["state"], st["health_status"]), ("running", "none"))

        status, st = await self.api.post(f"/containers/{name}/stop?timeout=5")
        self.assertEqual((status, st["state"]), (200, "exited"))
        self.assertTrue(st["status"].startswith("Exited (0)"), st)

        status, st = await self.api.post(f"/containers/{name}/start")
        self.assertEqual((status, st["state"]), (200, "running"))

        status, st = await self.api.post(f"/containers/{name}/restart")
        self.assertEqual((status, st["state"]), (200, "running"))

        status, err = await self.api.post(f"/containers/{name}/remove")
        self.assertEqual(status, 409, err)

        status, st = await self.api.post(f"/containers/{name}/remove?force=true&volumes=true")
        self.assertEqual((status, st["removed"]), (200, True))
        status, err = await self.api.get(f"/containers/{name}/status")
        self.assertEqual((status, err["error"]), (404, "container not found"))

    def test_status_stop_start_restart_remove(self) -> Any:
        return defer.ensureDeferred(self._lifecycle())

    async def _not_found(self) -> None:
        missing = "pa-test-missing-" + self.name()[-8:]
        for method, path in [
            ("POST", "start"), ("POST", "stop"), ("POST", "restart"), ("POST", "remove"),
            ("GET", "status"), ("GET", "health"), ("GET", "logs"), ("GET", "inspect"),
            ("GET", "logs?follow=true"),
        ]:
            status, err = await self.api.call(method, f"/containers/{missing}/{path}")
            self.assertEqual(status, 404, (path, err))
            self.assertEqual(err["error"], "container not found")
            self.assertIn(missing, err["details"])
        status, err = await self.api.post(f"/containers/{missing}/exec", {"command": ["true"]})
        self.assertEqual(status, 404)

    def test_every_container_route_is_404_for_an_unknown_container(self) -> Any:
        return defer.ensureDeferred(self._not_found())

    async def _bad_query(self) -> None:
        doc = await self.run_container()
        for path in ("stop?timeout=soon", "remove?force=maybe"):
            status, err = await self.api.post(f"/containers/{doc['name']}/{path}")
            self.assertEqual(status, 400, err)
        status, err = await self.api.get(f"/containers/{doc['name']}/logs?tail=-1")
        self.assertEqual(status, 400, err)

    def test_malformed_query_parameters_are_400(self) -> Any:
        return defer.ensureDeferred(self._bad_query())

    async def _huge_timeout(self) -> None:
        for action in ("stop", "restart"):
            status, err = await self.api.post(f"/containers/pa-test-absent/{action}?timeout=4380790747497521843024166912")
            self.assertEqual((status, err["error"]), (400, "invalid timeout"), action)

    def test_stop_and_restart_timeout_over_an_hour_is_400_before_docker_is_asked(self) -> Any:
        return defer.ensureDeferred(self._huge_timeout())

    # -- inspect, exec -----------------------------------------------------

    async def _inspect(self) -> None:
        doc = await self.run_container()
        status, info = await self.api.get(f"/containers/{doc['name']}/inspect")
        self.assertEqual(status, 200)
        self.assertEqual(info, self.docker.api.inspect_container(doc["name"]))

    def test_inspect_returns_dockers_json_unchanged(self) -> Any:
        return defer.ensureDeferred(self._inspect())

    async def _exec(self) -> None:
        doc = await self.run_container()
        status, result = await self.api.post(
            f"/containers/{doc['name']}/exec",
            {"command": ["sh", "-c", "echo out; echo err >&2; id -u; pwd; exit 3"], "user": "nobody", "workdir": "/tmp"},
        )
        self.assertEqual(status, 200)
        self.assertEqual(result["exit_code"], 3)
        for text in ("out", "err", "65534", "/tmp"):
            self.assertIn(text, result["output"])
        status, result = await self.api.post(f"/containers/{doc['name']}/exec", {"command": "echo $((40+2))"})
        self.assertEqual((status, result["exit_code"], result["output"]), (200, 0, "42\n"))

    def test_exec_returns_exit_code_and_output_honouring_user_and_workdir(self) -> Any:
        return defer.ensureDeferred(self._exec())

    async def _exec_stopped(self) -> None:
        doc = await self.run_container(command=["true"])
        await self.api.post(f"/containers/{doc['name']}/stop")
        status, err = await self.api.post(f"/containers/{doc['name']}/exec", {"command": ["true"]})
        self.assertEqual(status, 409, err)
        self.assertIn("not running", err["details"])
        status, err = await self.api.post(f"/containers/{doc['name']}/exec", {"user": "root"})
        self.assertEqual((status, err["error"]), (400, "command is required"))

    def test_exec_in_a_stopped_container_is_409(self) -> Any:
        return defer.ensureDeferred(self._exec_stopped())

    # -- logs ---------------------------------------------------------------

    async def _logs_tail(self) -> None:
        doc = await self.run_container(command=["sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2; sleep 300"])
        name = doc["name"]
        # Wait for the output through the API itself (no sleeping).
        d = await self.api.request("GET", f"/containers/{name}/logs?follow=true&tail=all")
        await td.read_until(d, lambda data: b"oops" in data)
        await self.agent.pool.when_idle()
        status, logs = await self.api.get(f"/containers/{name}/logs?tail=2")
        self.assertEqual(status, 200)
        # Docker copies stdout and stderr concurrently, so their relative
        # order in the log is not fixed: compare as sets.
        self.assertEqual(len(logs["logs"].split()), 2)
        status, logs = await self.api.get(f"/containers/{name}/logs")
        self.assertEqual(sorted(logs["logs"].split()), ["line1", "line2", "line3", "line4", "line5", "oops"])

    def test_logs_honour_tail_and_include_stderr(self) -> Any:
        return defer.ensureDeferred(self._logs_tail())

    async def _logs_follow(self) -> None:
        doc = await self.run_container(command=["sh", "-c", LOOP])
        response = await self.api.request("GET", f"/containers/{doc['name']}/logs?follow=true&tail=1")
        self.assertEqual(response.code, 200)
        # Streamed: no length announced up front.
        self.assertIsNone(response.headers.getRawHeaders(b"content-length"))
        seen = await td.read_until(response, lambda data: data.count(b"\n") >= 4)
        lines = seen.decode().splitlines()
        numbers = [int(line.split()[1]) for line in lines[:4]]
        # Consecutive lines as they were written: a live stream, not a replay.
        self.assertEqual(numbers, list(range(numbers[0], numbers[0] + 4)))
        # The client has hung up: the worker reading Docker's stream ends.
        await self.agent.pool.when_idle()
        self.assertEqual(self.agent.pool.active, 0)
        # The worker hands its result to the reactor just before it leaves
        # ThreadPool's bookkeeping: wait (bounded) for that last step.
        for _ in range(200):
            if not self.agent.pool.threadpool.working:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.agent.pool.threadpool.working, [])

    def test_follow_logs_streams_lines_and_stops_when_the_client_disconnects(self) -> Any:
        return defer.ensureDeferred(self._logs_follow())

    async def _logs_follow_ends(self) -> None:
        doc = await self.run_container(command=["sh", "-c", "echo one; echo two"])
        response = await self.api.request("GET", f"/containers/{doc['name']}/logs?follow=true")
        body = await response.content()
        self.assertEqual(body, b"one\ntwo\n")

    def test_follow_logs_of_a_container_that_exits_ends_the_body(self) -> Any:
        return defer.ensureDeferred(self._logs_follow_ends())

    # -- health ---------------------------------------------------------------

    async def _health_running(self) -> None:
        doc = await self.run_container(command=["httpd", "-f", "-p", "80"], ports=["127.0.0.1:0:80"])
        status, health = await self.api.get(f"/containers/{doc['name']}/health")
        self.assertEqual(status, 200)
        self.assertEqual((health["state"], health["healthy"]), ("running", True), health)
        [port] = health["ports"]
        self.assertEqual((port["container_port"], port["reachable"]), ("80/tcp", True))
        self.assertIn("timestamp", health)

    def test_health_of_a_running_container_checks_its_published_port(self) -> Any:
        return defer.ensureDeferred(self._health_running())

    async def _health_closed_port(self) -> None:
        doc = await self.run_container(ports=["127.0.0.1:0:80"])
        status, health = await self.api.get(f"/containers/{doc['name']}/health")
        self.assertEqual(status, 200)
        [port] = health["ports"]
        self.assertFalse(port["reachable"], health)
        self.assertFalse(health["healthy"])

    def test_health_reports_a_published_port_nothing_listens_on(self) -> Any:
        return defer.ensureDeferred(self._health_closed_port())

    async def _health_exited(self) -> None:
        doc = await self.run_container(command=["sh", "-c", "exit 137"])
        self.docker.api.wait(doc["id"])
        status, health = await self.api.get(f"/containers/{doc['name']}/health")
        self.assertEqual(status, 200)
        self.assertEqual((health["state"], health["healthy"], health["exit_code"]), ("exited", False, 137))
        self.assertIn("SIGKILL", health["exit_meaning"])

    def test_health_of_an_exited_container_explains_its_exit_code(self) -> Any:
        return defer.ensureDeferred(self._health_exited())

    async def _all_health(self) -> None:
        up = await self.run_container()
        down = await self.run_container(command=["sh", "-c", "exit 1"])
        self.docker.api.wait(down["id"])
        status, doc = await self.api.get("/containers/all/health")
        self.assertEqual(status, 200)
        self.assertTrue(doc["containers"][up["name"]]["healthy"])
        self.assertFalse(doc["containers"][down["name"]]["healthy"])
        self.assertEqual(doc["containers"][down["name"]]["exit_meaning"], "application error")
        self.assertEqual(doc["total"], len(doc["containers"]))

    def test_all_health_maps_names_to_health(self) -> Any:
        return defer.ensureDeferred(self._all_health())
