"""
Hostile-input fuzzing of both APIs with schemathesis, against a real daemon.

One ``twistd -n plexagent`` process per test, configured with:

- the Node Agent API on loopback TCP with an API key and a real Docker engine
  (the test daemon of scripts/setup-test-env.sh) behind it;
- ``agent_api.allowed_paths`` = one temp root, so no fuzzed file write,
  upload, build context or volume can reach the rest of the host;
- the Local Node API's TCP listener with a bearer token (and its socket);
- a recording fake ``systemctl`` (service status and restarts only record),
  ``ufw`` inside a private network namespace (rules never reach the host's
  firewall) and a real nginx under a temp prefix for ``nginx -t``.

schemathesis (the ``st`` CLI, run as a child process so the reactor keeps
serving) then sends generated valid and invalid requests built from each
published document over loopback TCP (the Local Node API also over its
Unix socket, through a TCP bridge, and in link-driven sequences of report
writes, reads and deletes), with a per-request timeout, and checks: no 5xx,
every status, content type, header and body as the document says, no request
past the timeout. Afterwards the daemon must still answer on both APIs.

Left out of the fuzz (each is covered by its own tests):

- ``POST /git/clone``: it reaches git hosts; none is reachable from CI, so
  it can only answer the documented 500 (``git clone failed``) after
  network timeouts;
- ``POST /images/cleanup``: prunes images of the Docker engine other tests
  share;
- ``POST /networks/create``: every valid body takes one of Docker's few
  default address pools, which other tests need.

Bounded to be harmless (see tests/fuzz_hooks.py): Docker object names are
prefixed so they can never match another test's container by name or ID
prefix; image references, pulls and logins go to a registry of the test's
own on loopback (Debian's docker-registry, with a password), where every
fuzzed image is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from typing import Any

import docker
import treq
from twisted.internet import defer, protocol, reactor, task
from twisted.logger import Logger
from twisted.trial import unittest

from plexagent.testing import docker as docker_fixtures
from plexagent.testing import ops
from plexagent.testing.fixtures import AgentProcess, AgentSandbox, unix_http_client, write_secret_file

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
OPENAPI = os.path.join(PROJECT, "plexagent", "http", "openapi")

#: Generated cases per operation (and phase); keeps the whole run to minutes.
MAX_EXAMPLES = int(os.environ.get("PLEXAGENT_FUZZ_EXAMPLES", "50"))
#: A request not answered within this many seconds is a hang.
REQUEST_TIMEOUT = 20.0
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
])

#: The Local Node API's document links a written report to reading,
#: replacing (If-Match) and deleting it: sequences are fuzzed too.
LOCAL_PHASES = "examples,coverage,fuzzing,stateful"

#: (method, path) left out of the agent API's fuzz; see the module docstring.
AGENT_API_EXCLUDED = [
    ("POST", "/git/clone"),
    ("POST", "/images/cleanup"),
    ("POST", "/networks/create"),
]


class _Collector(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(-1 if code is None else code)


class FuzzedAgent:
    """The daemon under fuzz, with the host pieces it is configured against."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.sandbox = AgentSandbox()
        testcase.addCleanup(self.sandbox.cleanup)
        self.allowed_root = os.path.join(self.sandbox.root, "allowed")
        os.makedirs(self.allowed_root)
        self.systemctl = ops.FakeSystemctl(testcase)
        for unit in ("nginx", "docker", "node-agent"):
            self.systemctl.add_unit(unit, ActiveState="active", UnitFileState="enabled")
        self.firewall = ops.FirewallNamespace(testcase)
        self.nginx = ops.Nginx(testcase)
        self.agent_port = docker_fixtures._free_port()
        self.node_port = docker_fixtures._free_port()
        self.api_key = docker_fixtures.derive_api_key("fuzz-" + uuid.uuid4().hex)
        write_secret_file(os.path.join(self.sandbox.root, "api-key"), self.api_key)
        self.sandbox.enable_http(f"127.0.0.1:{self.node_port}")
        document = self.sandbox.document
        document["node_api"].update({"socket_group": "", "secrets_group": ""})
        document["agent_api"].update({
            "enabled": True,
            "listen": f"127.0.0.1:{self.agent_port}",
            "allowed_paths": [self.allowed_root + "/"],
        })
        document["docker"] = {"host": docker_fixtures.docker_host(), "threads": 8}
        document["system"] = {
            "path": self.systemctl.path,
            "systemctl": [os.path.join(self.systemctl.bin, "systemctl")],
            "ufw": self.firewall.command,
            "program_timeout": 15.0,
        }
        document["nginx"] = {"command": self.nginx.command, "prefix": self.nginx.prefix, "config": self.nginx.conf}
        document["cron"] = {"max_jobs": 20}
        self.process = AgentProcess(self.sandbox.write())
        testcase.addCleanup(self.stop)
        self.registry = docker_fixtures.Registry("fuzz", uuid.uuid4().hex)
        try:
            self.registry.start()
        except (OSError, RuntimeError) as e:
            docker_fixtures.unreachable(testcase, "docker-registry", str(e))
        testcase.addCleanup(self.registry.stop)
        # The container fuzzed names often become (see fuzz_hooks): a shell
        # without a network that exits at once on SIGTERM (so a fuzzed stop
        # or restart never waits out its timeout), removed after the test
        # unless the fuzz removed it.
        self.target = "pa-fuzz-target-" + uuid.uuid4().hex[:8]
        client = docker_fixtures.test_client(testcase)
        client.containers.run(
            docker_fixtures.base_image(), ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"],
            name=self.target, detach=True, network_mode="none",
        )

        def remove_target() -> None:
            try:
                client.api.remove_container(self.target, force=True)
            except docker.errors.NotFound:
                pass

        testcase.addCleanup(remove_target)

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_port}"

    @property
    def node_url(self) -> str:
        return f"http://127.0.0.1:{self.node_port}"

    def sandbox_entries(self) -> set[str]:
        """The sandbox's top level: the allowed root is inside, its siblings outside."""
        return set(os.listdir(self.sandbox.root))

    async def start(self) -> None:
        self.entries_before = self.sandbox_entries()
        self.process.start()
        await self.process.wait_for_socket(self.sandbox.socket)
        # The TCP listeners start with the socket; wait until /ping answers.
        for _ in range(200):
            try:
                response = await treq.get(self.agent_url + "/ping", persistent=False)
                await response.content()
                return
            except Exception:
                await task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"the agent API never answered:\n{self.process.output}")

    async def stop(self) -> None:
        if self.process.watcher is not None and self.process.watcher.status is None:
            self.process.kill()
            await self.process.wait()


async def run_schemathesis(testcase: unittest.TestCase, document: str, url: str, headers: list[str],
                           excluded: list[tuple[str, str]] = (), agent: FuzzedAgent | None = None,
                           phases: str = "examples,coverage,fuzzing",
                           ) -> tuple[int, str, list[dict[str, Any]], set[str]]:
    """Run ``st run`` on ``document`` against ``url``; (exit code, output, failures from the JUnit report)."""
    workdir = tempfile.mkdtemp(prefix="pa-fuzz-")
    testcase.addCleanup(shutil.rmtree, workdir, True)
    junit = os.path.join(workdir, "junit.xml")
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run", os.path.join(OPENAPI, document),
        "--url", url,
        "--checks", CHECKS,
        "--phases", phases,
        "--max-examples", str(MAX_EXAMPLES),
        "--request-timeout", str(REQUEST_TIMEOUT),
        "--workers", "1",
        "--seed", os.environ.get("PLEXAGENT_FUZZ_SEED", "8"),
        "--suppress-health-check", "all",
        "--no-color",
        "--report", "junit", "--report-junit-path", junit,
    ]
    for header in headers:
        argv += ["--header", header]
    if excluded:
        # Each excluded path has that one method only.
        argv += ["--exclude-path-regex", "^(" + "|".join(path for _, path in excluded) + ")$"]
    env = dict(os.environ)
    env["SCHEMATHESIS_HOOKS"] = "tests.fuzz_hooks"
    if agent is not None:
        env["PLEXAGENT_FUZZ_ROOT"] = agent.allowed_root
        env["PLEXAGENT_FUZZ_TARGET"] = agent.target
        env["PLEXAGENT_FUZZ_REGISTRY"] = agent.registry.address
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT, env.get("PYTHONPATH", "")]))
    collector = _Collector()
    reactor.spawnProcess(collector, argv[0], argv, env=env, path=workdir)
    code = await collector.ended
    output = bytes(collector.output).decode("utf-8", "replace")
    Logger().info("schemathesis on {document}:\n{output}", document=document, output=output)
    return code, output, junit_failures(junit), junit_operations(junit)


def junit_failures(path: str) -> list[dict[str, Any]]:
    """Each failure or error of the report; one pseudo-failure when there is no report."""
    import xml.etree.ElementTree as ET

    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as e:
        return [{"operation": None, "kind": "no report", "message": str(e)}]
    failures = []
    for case in tree.iter("testcase"):
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                failures.append({"operation": case.get("name"), "kind": kind,
                                 "message": (node.get("message") or node.text or "")[:2000]})
    return failures


def junit_operations(path: str) -> set[str]:
    """The operations the report says were tested (``GET /ping``, ...)."""
    import xml.etree.ElementTree as ET

    try:
        return {case.get("name") or "" for case in ET.parse(path).iter("testcase")}
    except (OSError, ET.ParseError):
        return set()


def fuzzed_operations(document: str, excluded: list[tuple[str, str]] = ()) -> set[str]:
    from plexagent.http.openapi import documented_routes

    return {f"{m} {p}" for m, p in documented_routes(document) if (m, p) not in set(excluded)}


def socket_bridge(path: str) -> Any:
    """A listening port on 127.0.0.1 whose every connection is relayed to the Unix socket ``path``."""
    factory = protocol.Factory.forProtocol(docker_fixtures._Relay)
    factory.relays = set()  # type: ignore[attr-defined]
    factory.reactor = reactor  # type: ignore[attr-defined]
    factory.target = path  # type: ignore[attr-defined]
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


class FuzzTests(unittest.TestCase):
    timeout = 900

    def assert_clean(self, result: tuple[int, str, list[dict[str, Any]], set[str]], expected: set[str]) -> None:
        code, output, failures, tested = result
        self.assertEqual((code, failures), (0, []), output[-20000:])
        # Every operation not left out was really exercised.
        self.assertEqual(expected - tested, set(), output[-5000:])

    async def test_node_agent_api_answers_every_fuzzed_request_as_documented(self) -> None:
        agent = FuzzedAgent(self)
        await agent.start()
        result = await run_schemathesis(
            self, "node-agent-api.yaml", agent.agent_url, [f"X-API-Key: {agent.api_key}"], AGENT_API_EXCLUDED, agent
        )
        self.assert_clean(result, fuzzed_operations("node-agent-api", AGENT_API_EXCLUDED))
        # Still serving, and nothing escaped the allowed root.
        response = await treq.get(agent.agent_url + "/containers", headers={"X-API-Key": agent.api_key},
                                  persistent=False)
        self.assertEqual(response.code, 200, await response.text())
        response = await treq.get(agent.agent_url + "/ping", persistent=False)
        self.assertEqual(json.loads(await response.content())["docker"], True)
        self.assertIsNone(agent.process.watcher.status, agent.process.output)
        self.assertEqual(agent.sandbox_entries() - agent.entries_before - {"data"}, set())

    async def test_local_node_api_on_its_unix_socket_answers_every_fuzzed_request_as_documented(self) -> None:
        # schemathesis speaks TCP only: a loopback bridge to the socket. The
        # peer the agent sees is this (root) process: secret reads allowed.
        agent = FuzzedAgent(self)
        await agent.start()
        bridge = socket_bridge(agent.sandbox.socket)
        self.addCleanup(bridge.stopListening)
        url = f"http://127.0.0.1:{bridge.getHost().port}"
        result = await run_schemathesis(self, "local-node-api.yaml", url, [], phases=LOCAL_PHASES)
        self.assert_clean(result, fuzzed_operations("local-node-api"))
        client = unix_http_client(agent.sandbox.socket)
        response = await client.get("http://localhost/v1/state")
        self.assertEqual(response.code, 200, await response.text())
        self.assertIsNone(agent.process.watcher.status, agent.process.output)

    async def test_local_node_api_answers_every_fuzzed_request_as_documented(self) -> None:
        agent = FuzzedAgent(self)
        await agent.start()
        result = await run_schemathesis(
            self, "local-node-api.yaml", agent.node_url, [f"Authorization: Bearer {agent.sandbox.http_token}"],
            phases=LOCAL_PHASES,
        )
        self.assert_clean(result, fuzzed_operations("local-node-api"))
        response = await treq.get(agent.node_url + "/v1/state",
                                  headers={"Authorization": f"Bearer {agent.sandbox.http_token}"}, persistent=False)
        self.assertEqual(response.code, 200, await response.text())
        self.assertIsNone(agent.process.watcher.status, agent.process.output)
