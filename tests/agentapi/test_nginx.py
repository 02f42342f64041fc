"""
nginx: a real Debian nginx started by the test under a temporary prefix,
tested and reloaded by the agent; reloads through systemd (a recording fake
systemctl) and inside a container (Docker exec).
"""

from __future__ import annotations

import io
import tarfile
import time

import treq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from plexagent.testing.docker import AgentClient, base_image, test_client, unique_name
from plexagent.testing.ops import BROKEN_NGINX_CONF, VALID_NGINX_CONF, FakeSystemctl, Nginx, start_agent


@defer.inlineCallbacks
def served_greeting(port: int, expected: str, deadline: float = 10.0):
    """What nginx answers, polled until it says ``expected`` (nginx reloads asynchronously)."""
    until = time.monotonic() + deadline
    text = None
    while time.monotonic() < until:
        try:
            response = yield treq.get(f"http://127.0.0.1:{port}/", persistent=False)
            text = (yield response.text()).strip()
        except Exception:  # noqa: BLE001 - not listening yet
            text = None
        if text == expected:
            return text
        yield task.deferLater(reactor, 0.05, lambda: None)
    return text


class HostNginxTests(unittest.TestCase):
    def setUp(self) -> None:
        self.nginx = Nginx(self)
        # No systemd on this host: the fake systemctl answers like one without it.
        self.systemctl = FakeSystemctl(self, mode="offline")
        self.agent = start_agent(self, extra={
            "nginx": {"command": self.nginx.command, "prefix": self.nginx.prefix,
                      "config": self.nginx.conf},
            "system": {"path": self.systemctl.path},
        })
        self.client = AgentClient(self.agent)

    @defer.inlineCallbacks
    def test_valid_configuration_tests_valid(self):
        code, body = yield self.client.get("/nginx/test")
        self.assertEqual(code, 200)
        self.assertIs(body["valid"], True)
        self.assertIn("test is successful", body["output"])

    @defer.inlineCallbacks
    def test_broken_configuration_tests_invalid_with_nginx_message(self):
        self.nginx.write(BROKEN_NGINX_CONF)
        code, body = yield self.client.get("/nginx/test")
        self.assertEqual(code, 200)
        self.assertIs(body["valid"], False)
        self.assertIn('unknown directive "this_is_not_a_directive"', body["output"])

    @defer.inlineCallbacks
    def test_reload_applies_a_valid_configuration(self):
        self.nginx.start()
        self.assertEqual((yield served_greeting(self.nginx.port, "first")), "first")
        self.nginx.write(VALID_NGINX_CONF, greeting="second")
        code, body = yield self.client.post("/nginx/reload")
        self.assertEqual(code, 200, body)
        self.assertEqual((body["success"], body["method"]), (True, "signal"))
        self.assertEqual((yield served_greeting(self.nginx.port, "second")), "second")

    @defer.inlineCallbacks
    def test_reload_refuses_an_invalid_configuration_with_409(self):
        self.nginx.start()
        self.assertEqual((yield served_greeting(self.nginx.port, "first")), "first")
        self.nginx.write(BROKEN_NGINX_CONF)
        code, body = yield self.client.post("/nginx/reload")
        self.assertEqual(code, 409)
        self.assertEqual(body["error"], "nginx configuration is invalid")
        self.assertIn('unknown directive "this_is_not_a_directive"', body["details"])
        # The running nginx still serves the old configuration.
        self.assertEqual((yield served_greeting(self.nginx.port, "first")), "first")

    @defer.inlineCallbacks
    def test_reload_uses_systemd_when_it_manages_nginx(self):
        self.systemctl.set_mode("systemd")
        self.systemctl.add_unit("nginx", ActiveState="active", UnitFileState="enabled")
        code, body = yield self.client.post("/nginx/reload")
        self.assertEqual(code, 200, body)
        self.assertEqual(body["method"], "systemd")
        self.assertIn(["reload", "nginx"], self.systemctl.calls())


class MissingNginxTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_missing_nginx_is_503_with_a_clear_message(self):
        agent = start_agent(self, extra={"nginx": {"command": ["no-such-nginx-xyz"]}})
        client = AgentClient(agent)
        for method, path in (("GET", "/nginx/test"), ("POST", "/nginx/reload")):
            code, body = yield client.call(method, path)
            self.assertEqual(code, 503, path)
            self.assertEqual(body["error"], "nginx not available")
            self.assertIn("no-such-nginx-xyz is not installed", body["details"])


FAKE_NGINX = b"""#!/bin/sh
echo "$@" >> /tmp/nginx-calls
if [ "$1" = "-t" ]; then
    if [ -f /tmp/broken ]; then
        echo 'nginx: [emerg] unknown directive "oops" in /etc/nginx/nginx.conf:3' >&2
        exit 1
    fi
    echo "nginx: configuration file /etc/nginx/nginx.conf test is successful" >&2
fi
exit 0
"""


class ContainerNginxTests(unittest.TestCase):
    """A busybox container with a recording ``nginx`` stands in for the nginx image."""

    def setUp(self) -> None:
        self.docker = test_client(self)
        self.name = unique_name(self, self.docker, "nginx")
        self.container = self.docker.containers.run(base_image(), ["sleep", "300"], name=self.name, detach=True)
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            entry = tarfile.TarInfo("nginx")
            entry.size = len(FAKE_NGINX)
            entry.mode = 0o755
            tar.addfile(entry, io.BytesIO(FAKE_NGINX))
        self.container.put_archive("/bin", archive.getvalue())
        self.agent = start_agent(self, extra={"nginx": {"container": self.name}})
        self.client = AgentClient(self.agent)

    def calls(self) -> str:
        return self.container.exec_run(["cat", "/tmp/nginx-calls"]).output.decode()

    @defer.inlineCallbacks
    def test_reload_tests_then_reloads_inside_the_container(self):
        code, body = yield self.client.post("/nginx/reload")
        self.assertEqual(code, 200, body)
        self.assertEqual(body["method"], "docker")
        self.assertEqual(self.calls(), "-t\n-s reload\n")

    @defer.inlineCallbacks
    def test_invalid_configuration_in_the_container_is_409_and_not_reloaded(self):
        self.container.exec_run(["touch", "/tmp/broken"])
        code, body = yield self.client.post("/nginx/reload")
        self.assertEqual(code, 409)
        self.assertIn('unknown directive "oops"', body["details"])
        self.assertEqual(self.calls(), "-t\n")

    @defer.inlineCallbacks
    def test_a_missing_container_is_503(self):
        self.container.remove(force=True)
        code, body = yield self.client.get("/nginx/test")
        self.assertEqual(code, 503)
        self.assertEqual(body["error"], "nginx not available")
        self.assertIn(self.name, body["details"])
