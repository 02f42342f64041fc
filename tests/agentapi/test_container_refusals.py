"""
Refused container parameters are the client's to fix: a 4xx JSON error
saying what was refused, whether the agent refuses them before Docker is
asked (every numeric field, modes, names) or Docker refuses them (an
unknown user, a port in use). Real agent, real daemon.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from plexagent import errors
from plexagent.testing import docker as td

#: (field path, body change, error) for every numeric field of a container
#: spec, each with values a client must not get a 500 for.
HOSTILE_NUMBERS: list[tuple[str, dict[str, Any], str]] = [
    *[
        (f"health_check.{field}={value!r}", {"health_check": {"test": "true", field: value}}, "invalid health_check")
        for field in ("interval", "timeout", "start_period")
        for value in (1e308, -1, -0.5, 10**30, 2**63, 1e-9, True, "30", [30], {"s": 30})
    ],
    *[
        (f"health_check.{field}=0", {"health_check": {"test": "true", field: 0}}, "invalid health_check")
        for field in ("interval", "timeout")
    ],
    *[
        (f"health_check.retries={value!r}", {"health_check": {"test": "true", "retries": value}}, "invalid health_check")
        for value in (1e308, -1, 3.5, 2**31, 10**30, True, "3")
    ],
    *[
        (f"restart_policy={value!r}", {"restart_policy": value}, "invalid restart_policy")
        for value in ("on-failure:-1", "on-failure:1e308", "on-failure:99999999999999999999999999999",
                      "on-failure:3.5", "on-failure:٣", {"Name": "on-failure", "MaximumRetryCount": 1e308},
                      {"Name": "on-failure", "MaximumRetryCount": -1}, {"Name": "on-failure", "MaximumRetryCount": True},
                      {"Name": "on-failure", "MaximumRetryCount": 2**31})
    ],
    *[
        (f"ports={value!r}", {"ports": value}, "invalid ports")
        for value in (["1e308:80"], ["80:1e308"], ["-1:80"], ["65536:80"], ["8_080:80"], ["٨٠:80"], ["80:0"],
                      [10**30], [-80], [80.5], [True], {"8080": 1e308}, {"8080": -80}, {"8080": 10**30},
                      {"8080": True}, {"1e3": 80}, ["300.1.1.1:8080:80"], ["[::1x]:8080:80"])
    ],
]


def _beyond_int64(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_beyond_int64(v) for v in value.values())
    if isinstance(value, list):
        return any(_beyond_int64(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63


class NumbersAreBoundedBeforeDockerIsAsked(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)

    async def _table(self) -> None:
        for label, change, error in HOSTILE_NUMBERS:
            name = td.unique_name(self, self.docker)
            body = {"name": name, "image": td.base_image(), "command": ["true"], **change}
            status, err = await self.api.post("/containers/run", body)
            if _beyond_int64(change):
                # The one JSON parser refuses these before any field is read.
                self.assertEqual((status, err["error"]), (400, "invalid JSON body"), label)
                self.assertIn("64-bit", err["details"], label)
            else:
                self.assertEqual((status, err.get("error") if isinstance(err, dict) else err), (400, error), label)
                field = label.split("=")[0].split(".")[-1].replace("restart_policy", "retry count")
                self.assertIn(field if field != "ports" else "ports[", err["details"], label)
            self.assertEqual(self.docker.api.containers(all=True, filters={"name": name}), [], label)

    def test_every_numeric_field_with_a_hostile_value_is_400_naming_it_and_creates_nothing(self) -> Any:
        return defer.ensureDeferred(self._table())

    async def _query(self) -> None:
        for path in ("stop?timeout=1e308", "restart?timeout=-1", "restart?timeout=99999999999999999999999999999",
                     "stop?timeout=1_0", "stop?timeout=%D9%A3", "stop?timeout=3601"):
            status, err = await self.api.post(f"/containers/pa-test-absent/{path}")
            self.assertEqual((status, err["error"]), (400, "invalid timeout"), path)
        status, err = await self.api.get("/containers/pa-test-absent/logs?tail=1e9")
        self.assertEqual((status, err["error"]), (400, "invalid tail"))

    def test_stop_and_restart_timeouts_and_tail_are_bounded_integers(self) -> Any:
        return defer.ensureDeferred(self._query())

    async def _in_bounds(self) -> None:
        name = td.unique_name(self, self.docker)
        status, doc = await self.api.post("/containers/run", {
            "name": name, "image": td.base_image(), "command": ["sleep", "300"],
            "health_check": {"test": "true", "interval": 0.5, "timeout": 365 * 24 * 3600, "start_period": 0,
                             "retries": 2**31 - 1},
            "restart_policy": {"Name": "on-failure", "MaximumRetryCount": 2**31 - 1},
            "ports": ["127.0.0.1:0:80"],
        })
        self.assertEqual(status, 201, doc)
        check = self.docker.api.inspect_container(name)["Config"]["Healthcheck"]
        self.assertEqual((check["Interval"], check["Timeout"], check["Retries"]),
                         (500_000_000, 365 * 24 * 3600 * 10**9, 2**31 - 1))

    def test_the_bounds_themselves_are_accepted(self) -> Any:
        return defer.ensureDeferred(self._in_bounds())


class StringsAreMatchedWhole(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)

    async def _table(self) -> None:
        volume = f"{self.agent.workdir}/v"
        cases = [
            ({"name": "web\n"}, "invalid name"),
            ({"volumes": [f"{volume}:/data:rw\n"]}, "invalid volumes"),
            ({"volumes": [f"{volume}:/data:rw,bogus"]}, "invalid volumes"),
            ({"volumes": [f"{volume}:/data:rw,ro"]}, "invalid volumes"),
            ({"volumes": [f"{volume}:/data:nocopy"]}, "invalid volumes"),
            ({"volumes": {volume: {"bind": "/data", "mode": "ro\n"}}}, "invalid volumes"),
            ({"volumes": ["cache\n:/data"]}, "invalid volumes"),
            ({"volumes": [f"{volume}:/"]}, "invalid volumes"),
            ({"volumes": [f"{volume}:/x/../.."]}, "invalid volumes"),
            ({"volumes": {volume: "/a:b"}}, "invalid volumes"),
            ({"environment": {"A": "x\x00y"}}, "invalid environment"),
            ({"environment": ["A=x\x00y"]}, "invalid environment"),
            ({"command": ["echo", "a\x00b"]}, "invalid command"),
            ({"workdir": "/a\x00b"}, "invalid workdir"),
            ({"workdir": "relative"}, "invalid workdir"),
            ({"hostname": "h" * 64}, "invalid hostname"),
            ({"hostname": "web\n"}, "invalid hostname"),
            ({"labels": {"plexagent.binds": "[]"}}, "invalid labels"),
            ({"labels": {"a": "b\x00"}}, "invalid labels"),
        ]
        for change, error in cases:
            name = td.unique_name(self, self.docker)
            body = {"name": name, "image": td.base_image(), "command": ["true"], **change}
            status, err = await self.api.post("/containers/run", body)
            self.assertEqual((status, err["error"]), (400, error), change)
            self.assertEqual(self.docker.api.containers(all=True, filters={"name": name}), [], change)

    def test_names_modes_and_strings_docker_would_refuse_are_400_before_docker_is_asked(self) -> Any:
        return defer.ensureDeferred(self._table())


class DockersRefusals(unittest.TestCase):
    """What only Docker can tell: said as the client's error, with Docker's reason."""

    def setUp(self) -> None:
        self.docker = td.test_client(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)
        self.facade = self.agent.top.agent.agent_services["docker"]

    async def _user(self) -> None:
        for user, missing in (("nosuchuser", "nosuchuser"), ("0:nosuchgroup", "nosuchgroup")):
            name = td.unique_name(self, self.docker)
            status, err = await self.api.post(
                "/containers/run", {"name": name, "image": td.base_image(), "command": ["true"], "user": user}
            )
            self.assertEqual((status, err["error"]), (400, "docker refused the user"), err)
            self.assertIn(missing, err["details"])
            self.assertEqual(self.docker.api.containers(all=True, filters={"name": name}), [])

    def test_run_as_an_unknown_user_or_group_is_400_naming_it(self) -> Any:
        return defer.ensureDeferred(self._user())

    async def _port_in_use(self) -> None:
        first = await self.api.post("/containers/run", {
            "name": td.unique_name(self, self.docker), "image": td.base_image(), "command": ["sleep", "300"],
            "ports": ["127.0.0.1:0:80"],
        })
        self.assertEqual(first[0], 201, first[1])
        port = self.docker.api.inspect_container(first[1]["id"])["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"]
        name = td.unique_name(self, self.docker)
        status, err = await self.api.post("/containers/run", {
            "name": name, "image": td.base_image(), "command": ["sleep", "300"], "ports": [f"127.0.0.1:{port}:80"],
        })
        self.assertEqual((status, err["error"]), (409, "a host port is already in use"), err)
        self.assertIn(port, err["details"])
        self.assertEqual(self.docker.api.containers(all=True, filters={"name": name}), [])

    def test_run_publishing_a_host_port_in_use_is_409(self) -> Any:
        return defer.ensureDeferred(self._port_in_use())

    async def _engine_answers(self) -> None:
        # Past the parser (as a future field or another caller might be):
        # Docker's own refusal is still the client's error, not a 500.
        volume = f"{self.agent.workdir}/v"
        for change, kind, message in (
            ({"volumes": {volume: {"bind": "/data", "mode": "rw,bogus"}}}, errors.InvalidInput,
             "docker refused the volumes"),
            ({"volumes": {volume: {"bind": "/", "mode": "rw"}}}, errors.InvalidInput, "docker refused the volumes"),
            ({"restart_policy": {"Name": "bogus"}}, errors.InvalidInput, "docker refused the restart policy"),
            ({"healthcheck": {"test": ["CMD", "true"], "interval": 5}}, errors.InvalidInput,
             "docker refused the health check"),
            ({"working_dir": "relative"}, errors.InvalidInput, "docker refused the working directory"),
            ({"image": "UPPER/case"}, errors.InvalidInput, "invalid image reference"),
            ({"network": "pa-test-no-such-net"}, errors.NotFound, "network not found"),
        ):
            name = td.unique_name(self, self.docker)
            kwargs = {"image": td.base_image(), "name": name, "command": ["true"], **change}
            failure = await self.assertFailure(self.facade.run(kwargs), kind)
            self.assertEqual(failure.message, message, change)
            self.assertTrue(failure.details, change)
            self.assertEqual(self.docker.api.containers(all=True, filters={"name": name}), [], change)

    def test_dockers_refusals_of_parameters_are_client_errors_with_dockers_reason(self) -> Any:
        return defer.ensureDeferred(self._engine_answers())
