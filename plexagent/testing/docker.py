"""
Test fixtures for the Docker-backed parts of the agent: the test Docker
daemon (``PLEXAGENT_TEST_DOCKER_HOST``, set up by
``scripts/setup-test-env.sh``), unique container names cleaned up after each
test, an agent API served for real on loopback, a registry with basic auth,
and a Unix-socket relay in front of the daemon that a test can cut and
restore (Docker going away and coming back).

When the test daemon is unreachable a test is skipped on a developer's
machine but FAILS when ``CI`` is set: a missing component must never pass
unnoticed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Any, cast

import docker
from twisted.internet import defer, endpoints, protocol
from twisted.internet import reactor as default_reactor
from twisted.python.failure import Failure
from twisted.trial import unittest

from plexagent.cli import derive_api_key  # the same derivation operators use
from plexagent.config import parse_config

BASE_IMAGE_DEFAULT = "plexagent-test/busybox:latest"
#: Names of everything a test creates start with this, for cleanup.
PREFIX = "pa-test-"


def docker_host() -> str:
    return os.environ.get("PLEXAGENT_TEST_DOCKER_HOST") or os.environ.get("DOCKER_HOST") or ""


def base_image() -> str:
    return os.environ.get("PLEXAGENT_TEST_BASE_IMAGE", BASE_IMAGE_DEFAULT)


def unreachable(testcase: unittest.TestCase, what: str, reason: str) -> None:
    """Fail under CI, skip elsewhere: the suite never passes without Docker."""
    message = f"{what} is unreachable ({reason}); run scripts/setup-test-env.sh"
    if os.environ.get("CI"):
        testcase.fail(message)
    raise unittest.SkipTest(message)


def test_client(testcase: unittest.TestCase) -> Any:
    """A docker-py client on the test daemon, closed after the test."""
    host = docker_host()
    if not host:
        unreachable(testcase, "the test Docker daemon", "PLEXAGENT_TEST_DOCKER_HOST is not set")
    try:
        client = docker.DockerClient(base_url=host, version="auto", timeout=120)
        client.ping()
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        unreachable(testcase, f"the test Docker daemon at {host}", type(e).__name__)
    testcase.addCleanup(client.close)
    try:
        client.images.get(base_image())
    except docker.errors.ImageNotFound:
        unreachable(testcase, f"the base image {base_image()}", "not imported")
    return client


def unique_name(testcase: unittest.TestCase, client: Any, label: str = "c") -> str:
    """A container name no other test uses; the container is removed after the test."""
    name = f"{PREFIX}{label}-{uuid.uuid4().hex[:10]}"

    def remove() -> None:
        try:
            client.api.remove_container(name, force=True, v=True)
        except docker.errors.NotFound:
            pass

    testcase.addCleanup(remove)
    return name


def unique_network_name(testcase: unittest.TestCase, client: Any, label: str = "net") -> str:
    """A network name no other test uses; the network (if made) is removed after the test."""
    name = f"{PREFIX}{label}-{uuid.uuid4().hex[:8]}"

    def remove() -> None:
        try:
            client.api.remove_network(name)
        except docker.errors.NotFound:
            pass

    testcase.addCleanup(remove)
    return name


def remove_image_later(testcase: unittest.TestCase, client: Any, reference: str) -> None:
    def remove() -> None:
        try:
            client.api.remove_image(reference, force=True)
        except docker.errors.NotFound:
            pass

    testcase.addCleanup(remove)




def image_tar(reference: str, created: str, content: bytes) -> bytes:
    """
    A ``docker save`` tar of a one-layer image named ``reference`` whose
    creation time is ``created`` (RFC 3339) and whose only file, ``/marker``,
    holds ``content``: ``docker load`` gives an image of exactly that age
    and size, sharing no layer with any other image.
    """
    import hashlib
    import io
    import json
    import tarfile

    def tar_of(files: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as archive:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                archive.addfile(info, io.BytesIO(data))
        return out.getvalue()

    layer = tar_of({"marker": content})
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": created,
        "config": {"Cmd": ["/marker"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "plexagent test image"}],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [reference], "Layers": ["layer/layer.tar"]}]).encode()
    return tar_of({"manifest.json": manifest, config_name: config, "layer/layer.tar": layer})


def load_image(testcase: unittest.TestCase, client: Any, reference: str, created: str, content: bytes) -> str:
    """``image_tar`` loaded into the test daemon (removed after the test); its ID."""
    for _ in client.api.load_image(image_tar(reference, created, content)):
        pass
    remove_image_later(testcase, client, reference)
    return client.api.inspect_image(reference)["Id"]


def commit_image(testcase: unittest.TestCase, client: Any, reference: str, cmd: list[str],
                 changes: tuple[str, ...] | list[str] = ()) -> str:
    """The base image with ``cmd`` as its CMD (and Dockerfile ``changes``), tagged ``reference``; its ID."""
    import json

    container = client.api.create_container(base_image(), command=["true"])
    try:
        repository, _, tag = reference.rpartition(":")
        answer = client.api.commit(container["Id"], repository=repository, tag=tag,
                                   changes=[f"CMD {json.dumps(cmd)}", *changes])
    finally:
        client.api.remove_container(container["Id"], force=True)
    remove_image_later(testcase, client, reference)
    return answer["Id"]


def agent_config(
    workdir: str,
    docker_host_url: str,
    api_key: str,
    listen: str = "127.0.0.1:0",
    allowed_ips: tuple[str, ...] = (),
    allowed_paths: tuple[str, ...] | None = None,
    threads: int = 4,
    max_upload_bytes: int | None = None,
    require_auth_always: bool = True,
    tls_cert: str = "",
    tls_key: str = "",
    replace_stable_time: float | None = None,
) -> Any:
    """A Config for an agent living in ``workdir`` (no control plane)."""
    key_file = os.path.join(workdir, "api-key")
    with open(key_file, "w") as f:
        f.write(api_key + "\n")
    os.chmod(key_file, 0o600)
    agent_api: dict[str, Any] = {
        "listen": listen,
        "api_key_file": key_file,
        "allowed_ips": list(allowed_ips),
        "require_auth_always": require_auth_always,
        "allowed_paths": list(allowed_paths if allowed_paths is not None else (workdir + "/",)),
    }
    if max_upload_bytes is not None:
        agent_api["max_upload_bytes"] = max_upload_bytes
    if tls_cert:
        agent_api["tls_cert"], agent_api["tls_key"] = tls_cert, tls_key
    document = {
        "node": {"data_dir": os.path.join(workdir, "data")},
        "node_api": {"socket": os.path.join(workdir, "api.sock"), "socket_group": "", "secrets_group": ""},
        "agent_api": agent_api,
        "docker": {"host": docker_host_url, "threads": threads},
    }
    if replace_stable_time is not None:
        document["docker"]["replace_stable_time"] = replace_stable_time
    return parse_config(document, {})


class RunningAgent:
    """The whole agent (``service.makeService``) started on loopback."""

    def __init__(self, top: Any, config: Any, api_key: str) -> None:
        self.top = top
        self.config = config
        self.api_key = api_key
        listener = top.getServiceNamed("agent_api.listen")
        address = listener.port.getHost()
        host = address.host
        self.host = host
        self.port = address.port
        scheme = "https" if config.agent_api.tls_cert else "http"
        self.base = f"{scheme}://[{host}]:{self.port}" if ":" in host else f"{scheme}://{host}:{self.port}"
        self.pool = top.getServiceNamed("dockerpool")

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key}


def start_agent(testcase: unittest.TestCase, reactor: Any = None, **config_kwargs: Any) -> RunningAgent:
    """Start an agent for this test (stopped after it); ``config_kwargs`` go to ``agent_config``."""
    from plexagent import service

    reactor = reactor or default_reactor
    workdir = tempfile.mkdtemp(prefix="pa-agent-")
    testcase.addCleanup(shutil.rmtree, workdir, True)
    api_key = derive_api_key("provisioning-token-" + uuid.uuid4().hex)
    config_kwargs.setdefault("docker_host_url", docker_host())
    config = agent_config(workdir, api_key=api_key, **config_kwargs)
    top = service.makeService(config, reactor)
    top.startService()
    testcase.addCleanup(top.stopService)
    agent = RunningAgent(top, config, api_key)
    agent.workdir = workdir  # type: ignore[attr-defined]
    return agent


# -- a relay in front of the daemon that a test can cut and restore ---------


class _Relay(protocol.Protocol):
    transport: Any
    factory: Any

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.peer: Any = None
        self.factory.relays.add(self)
        d = endpoints.UNIXClientEndpoint(self.factory.reactor, self.factory.target).connect(
            protocol.Factory.forProtocol(_RelayBack)
        )

        def connected(back: Any) -> None:
            back.peer = self
            self.peer = back
            self.transport.resumeProducing()

        d.addCallbacks(connected, lambda _: self.transport.abortConnection())

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.relays.discard(self)
        if self.peer is not None:
            self.peer.transport.loseConnection()


class _RelayBack(protocol.Protocol):
    transport: Any
    peer: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.peer is not None:
            self.peer.transport.loseConnection()


class DockerRelay:
    """
    ``unix://<dir>/docker.sock`` relaying to the test daemon. ``cut()``
    stops listening and drops every connection (to the agent, Docker is
    gone: the socket does not exist); ``restore()`` listens again.
    """

    def __init__(self, reactor: Any, target: str) -> None:
        self.reactor = reactor
        self.target = target[len("unix://"):] if target.startswith("unix://") else target
        self.directory = tempfile.mkdtemp(prefix="pa-relay-")
        self.path = os.path.join(self.directory, "docker.sock")
        self.factory = protocol.Factory.forProtocol(_Relay)
        self.factory.relays = set()  # type: ignore[attr-defined]
        self.factory.reactor = reactor  # type: ignore[attr-defined]
        self.factory.target = self.target  # type: ignore[attr-defined]
        self.port: Any = None

    @property
    def url(self) -> str:
        return "unix://" + self.path

    def restore(self) -> None:
        self.port = self.reactor.listenUNIX(self.path, self.factory)

    def cut(self) -> defer.Deferred[None]:
        for relay in list(self.factory.relays):  # type: ignore[attr-defined]
            relay.transport.abortConnection()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        d = self.cut()
        d.addBoth(lambda _: shutil.rmtree(self.directory, True))
        return d


# -- a registry with basic auth on loopback ------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """Debian's ``docker-registry`` on 127.0.0.1 with an htpasswd user."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password
        self.directory = tempfile.mkdtemp(prefix="pa-registry-")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.directory, "registry.log")

    def start(self) -> None:
        """Blocking (test setup only): start and wait until it answers."""
        htpasswd = os.path.join(self.directory, "htpasswd")
        subprocess.run(
            ["htpasswd", "-Bbc", htpasswd, self.username, self.password],
            check=True, capture_output=True,
        )
        config = os.path.join(self.directory, "config.yml")
        with open(config, "w") as f:
            f.write(
                "version: 0.1\n"
                "log:\n  level: warn\n"
                "storage:\n  filesystem:\n    rootdirectory: " + os.path.join(self.directory, "data") + "\n"
                "http:\n  addr: " + self.address + "\n"
                "auth:\n  htpasswd:\n    realm: plexagent-test\n    path: " + htpasswd + "\n"
            )
        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([binary, "serve", config], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: see {self.log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)  # readiness poll of an external process, not test synchronisation
        raise RuntimeError("docker-registry did not start listening")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, True)


class AgentClient:
    """treq against a running agent, with the API key unless told otherwise."""

    def __init__(self, agent: RunningAgent, reactor: Any = None, trust_pem: bytes | None = None) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

        self.agent = agent
        self.reactor = reactor or default_reactor
        policy = BrowserLikePolicyForHTTPS()
        if trust_pem is not None:
            from twisted.internet import ssl

            policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(trust_pem))
        # Not persistent: no connection outlives a test.
        self._agent = Agent(
            self.reactor, contextFactory=policy, pool=HTTPConnectionPool(self.reactor, persistent=False)
        )
        self.http = HTTPClient(cast(Any, self._agent))

    def request(self, method: str, path: str, key: str | None = "default", **kwargs: Any) -> defer.Deferred[Any]:
        headers = dict(kwargs.pop("headers", {}) or {})
        if key == "default":
            key = self.agent.api_key
        if key is not None:
            headers["X-API-Key"] = key
        url = self.agent.url(path)
        if "[" in url and not kwargs:
            # treq (hyperlink) cannot encode an IPv6 literal host: use the
            # plain Agent for these body-less requests.
            from twisted.web.http_headers import Headers

            raw = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
            return self._agent.request(method.encode("ascii"), url.encode("ascii"), raw)
        return self.http.request(method, url, headers=headers, **kwargs)

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """(status, parsed JSON body)."""
        import json

        import treq

        response = await self.request(method, path, **kwargs)
        body = await treq.content(response)
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, body

    def get(self, path: str, **kwargs: Any) -> defer.Deferred[tuple[int, Any]]:
        return defer.ensureDeferred(self.call("GET", path, **kwargs))

    def post(self, path: str, body: Any = None, **kwargs: Any) -> defer.Deferred[tuple[int, Any]]:
        if body is not None:
            kwargs["json"] = body
        return defer.ensureDeferred(self.call("POST", path, **kwargs))


class _PartialBody(protocol.Protocol):
    transport: Any

    def __init__(self, enough: Any, finished: defer.Deferred[bytes]) -> None:
        self.enough = enough
        self.data = b""
        self.finished = finished

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.finished.called and self.enough(self.data):
            self.finished.callback(self.data)
            # Hang up, as a client that has seen enough does.
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.finished.called:
            self.finished.callback(self.data)


def read_until(response: Any, enough: Any) -> defer.Deferred[bytes]:
    """
    Read a streamed body until ``enough(data_so_far)`` is true, then
    disconnect; fires with the data read (or all of it if the body ended).
    """
    finished: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_PartialBody(enough, finished))
    return finished
