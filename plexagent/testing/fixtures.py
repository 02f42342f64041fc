"""
Fixtures for tests of plexagent (ours and users'): temporary configs, an
in-process agent, HTTP clients for the Unix socket, and a real ``twistd``
process that can be killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from typing import Any

import treq
from twisted.internet import defer, endpoints, protocol, task
from twisted.internet import reactor as default_reactor
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from plexagent.config import Config, parse_config
from plexagent.controlplane.client import QuietConnectionPool


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(document: dict[str, dict[str, Any]]) -> str:
    """``document`` as TOML; a table inside a section (``docker.cleanup``) is written as its own table."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for key, value in values.items():
            if key not in nested:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
        for key, value in nested.items():
            table(f"{name}.{key}", value)

    for section, values in document.items():
        table(section, values)
    return "\n".join(lines)


def write_secret_file(path: str, content: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content + "\n")
    return path


class AgentSandbox:
    """
    A directory holding one agent's config, key files, data dir and socket.

    ``document`` is the TOML document as a dict; change it before
    ``write()``/``config()``. The socket lives in a short, world-traversable
    directory under /tmp (Unix socket paths are limited to 108 bytes, and
    tests connect as other users).
    """

    def __init__(self, base: str | None = None, control_plane: Any = None) -> None:
        self.root = tempfile.mkdtemp(prefix="pa-", dir=base)
        os.chmod(self.root, 0o755)
        self.run_dir = tempfile.mkdtemp(prefix="pa-sock-", dir="/tmp")
        os.chmod(self.run_dir, 0o755)
        self.socket = os.path.join(self.run_dir, "api.sock")
        self.data_dir = os.path.join(self.root, "data")
        self.http_token = "local-api-token-" + os.urandom(8).hex()
        self.api_key = os.urandom(16).hex()
        write_secret_file(os.path.join(self.root, "api-token"), self.http_token)
        write_secret_file(os.path.join(self.root, "api-key"), self.api_key)
        self.document: dict[str, dict[str, Any]] = {
            "node": {"data_dir": self.data_dir, "shutdown_timeout": 5.0},
            "node_api": {
                "socket": self.socket,
                "http_enabled": False,
                "http_token_file": os.path.join(self.root, "api-token"),
            },
            "agent_api": {"enabled": False, "api_key_file": os.path.join(self.root, "api-key")},
        }
        if control_plane is not None:
            self.use_control_plane(control_plane)

    def use_control_plane(self, sim: Any) -> None:
        """Talk to ``sim`` as its pre-registered node (``token_file`` and ``secret_key_file``)."""
        node = sim.example_node
        write_secret_file(os.path.join(self.root, "node-token"), node.nsk_text)
        write_secret_file(os.path.join(self.root, "nsk"), node.nsk_text)
        self.document["node"]["id"] = node.node_id
        self.document["node"]["secret_key_file"] = os.path.join(self.root, "nsk")
        self.document.setdefault("control_plane", {}).update(
            {
                "url": sim.url,
                "token_file": os.path.join(self.root, "node-token"),
                "request_timeout": 2.0,
                "connect_timeout": 1.0,
            }
        )

    def enroll_with(self, sim: Any) -> None:
        """Talk to ``sim`` as a new node that enrolls with a bootstrap token of its own."""
        path = write_secret_file(os.path.join(self.root, "bootstrap-token"), sim.issue_bootstrap_token())
        self.document.setdefault("control_plane", {}).update(
            {"url": sim.url, "bootstrap_token_file": path, "request_timeout": 2.0, "connect_timeout": 1.0}
        )

    def enable_http(self, listen: str = "127.0.0.1:0") -> None:
        self.document["node_api"]["http_enabled"] = True
        self.document["node_api"]["http_listen"] = listen

    @property
    def config_path(self) -> str:
        return os.path.join(self.root, "plexagent.toml")

    def write(self) -> str:
        with open(self.config_path, "w") as f:
            f.write(dump_toml(self.document))
        return self.config_path

    def config(self) -> Config:
        return parse_config(self.document, {})

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@implementer(IAgentEndpointFactory)
class _UnixEndpoints:
    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri: Any) -> Any:
        return endpoints.UNIXClientEndpoint(self._reactor, self._path)


def unix_http_client(path: str, reactor: Any = default_reactor, persistent: bool = False) -> treq.client.HTTPClient:
    """A treq client whose every request goes to the Unix socket ``path``."""
    pool = QuietConnectionPool(reactor, persistent=persistent)
    agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(reactor, path), pool=pool)
    client = treq.client.HTTPClient(agent)
    client.pool = pool  # type: ignore[attr-defined]
    return client


async def json_response(response: Any) -> tuple[int, Any]:
    body = await response.content()
    return response.code, (json.loads(body) if body else None)


class _ProcessWatcher(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.status: int | None = None
        self._expected: list[tuple[Any, defer.Deferred[Any]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._match()

    def errReceived(self, data: bytes) -> None:
        self.output += data
        self._match()

    def wait_for(self, pattern: str) -> defer.Deferred[Any]:
        """Fires with the match once the output matches the regular expression ``pattern``."""
        import re

        d: defer.Deferred[Any] = defer.Deferred()
        self._expected.append((re.compile(pattern.encode("utf-8")), d))
        self._match()
        return d

    def _match(self) -> None:
        for entry in list(self._expected):
            pattern, d = entry
            found = pattern.search(bytes(self.output))
            if found is not None:
                self._expected.remove(entry)
                d.callback(found)

    def processEnded(self, reason: Any) -> None:
        value = reason.value
        self.status = getattr(value, "exitCode", None)
        if self.status is None:
            self.status = -(getattr(value, "signal", 0) or 0)
        expected, self._expected = self._expected, []
        for pattern, d in expected:
            d.errback(AssertionError(
                f"the process ended ({self.status}) before its output matched {pattern.pattern!r}:\n"
                + bytes(self.output).decode("utf-8", "replace")
            ))
        self.ended.callback(self.status)


class AgentProcess:
    """A real ``twistd -n --pidfile= plexagent --config FILE`` process."""

    def __init__(self, config_path: str, reactor: Any = default_reactor, env: dict[str, str] | None = None,
                 preamble: str = "") -> None:
        self.config_path = config_path
        #: Python run in the agent's process before twistd (test hooks)
        self.preamble = preamble
        self.reactor = reactor
        self.env = dict(os.environ if env is None else env)
        self.watcher: _ProcessWatcher | None = None
        self.transport: Any = None

    def start(self) -> None:
        self.watcher = _ProcessWatcher()
        argv = [sys.executable, "-c", self.preamble + "\nfrom twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "plexagent", "--config", self.config_path]
        self.transport = self.reactor.spawnProcess(self.watcher, argv[0], argv, env=self.env)

    @property
    def output(self) -> str:
        return bytes(self.watcher.output).decode("utf-8", "replace") if self.watcher else ""

    async def wait_for_socket(self, path: str, timeout: float = 15.0) -> None:
        """Poll (on the reactor's clock) until the socket accepts connections."""
        import socket as socketlib

        deadline = self.reactor.seconds() + timeout
        while True:
            if self.watcher is not None and self.watcher.status is not None:
                raise AssertionError(f"agent exited early ({self.watcher.status}):\n{self.output}")
            probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            try:
                probe.connect(path)
                return
            except OSError:
                pass
            finally:
                probe.close()
            if self.reactor.seconds() > deadline:
                raise AssertionError(f"agent socket {path} never came up:\n{self.output}")
            await task.deferLater(self.reactor, 0.05, lambda: None)

    def wait_for_output(self, pattern: str) -> defer.Deferred[Any]:
        """Fires with the match once the agent's output matches the regular expression ``pattern``."""
        assert self.watcher is not None
        return self.watcher.wait_for(pattern)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.watcher is not None and self.watcher.status is None:
            self.transport.signalProcess({int(signal.SIGKILL): "KILL", int(signal.SIGTERM): "TERM"}.get(int(sig), sig))

    async def wait(self) -> int:
        assert self.watcher is not None
        return await self.watcher.ended
