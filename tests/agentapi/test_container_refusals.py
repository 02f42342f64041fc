"""
Refused container parameters are the client's to fix: a 4xx JSON error
saying what Docker refused (an unknown user, a port in use, a bad mode),
with Docker's reason. Real agent, real daemon.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from plexagent import errors
from plexagent.testing import docker as td

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
