"""
A control-plane simulator that follows ``spec/control-plane.md``, on a real
TCP port, with injectable faults.

Importable by users' own tests::

    sim = ControlPlaneSimulator.example()
    await sim.start(reactor)
    ... config control_plane.url = sim.url, node.id = sim.node_id ...
    sim.faults.fail("state", status=503, times=2, retry_after=1)
    await sim.stop()

It records what the agent sent (``reports``, ``heartbeats``, ``requests``)
so tests can assert on it.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import attrs
from klein import Klein
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.web import server
from twisted.web.iweb import IRequest

from plexagent.secrets import SecretBox

EXAMPLE_NODE_ID = "edge-us-west-42"


@attrs.define
class Failure:
    status: int
    times: int
    retry_after: float | None = None


@attrs.define
class Faults:
    """What the simulator does wrong, set by tests."""

    #: seconds to wait before answering any request
    delay: float = 0.0
    #: per endpoint name ("state", "secret", "report", "heartbeat", "events"):
    #: answer ``status`` for the next ``times`` requests
    failures: dict[str, Failure] = attrs.field(factory=dict)
    #: flip a bit of every secret ciphertext
    tamper_secrets: bool = False

    def fail(self, endpoint: str, status: int = 503, times: int = 1, retry_after: float | None = None) -> None:
        self.failures[endpoint] = Failure(status, times, retry_after)

    def clear(self) -> None:
        self.delay = 0.0
        self.failures.clear()
        self.tamper_secrets = False


@attrs.define
class NodeRecord:
    """What the control plane holds for one node."""

    metadata: dict[str, str] = attrs.field(factory=dict)
    data: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    secrets: dict[str, tuple[bytes, int]] = attrs.field(factory=dict)
    #: reports as the control plane has them: key -> entry
    reports: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def state_document(self) -> dict[str, Any]:
        return {
            "metadata": dict(self.metadata),
            "data": [self.data[k] for k in sorted(self.data)],
            "secret_refs": [{"key": k, "version": v} for k, (_, v) in sorted(self.secrets.items())],
        }


def example_record() -> NodeRecord:
    """The example node of the Local Node API guide."""
    return NodeRecord(
        metadata={"node_id": EXAMPLE_NODE_ID, "region": "us-west-2", "role": "gateway"},
        data={
            "nginx.conf": {
                "key": "nginx.conf",
                "content_type": "text/plain",
                "payload": "server {\n    listen 80;\n    location / { proxy_pass http://10.0.0.5:8080; }\n}\n",
                "version": 3,
                "updated_at": "2025-06-01T12:00:00Z",
            },
            "routes.json": {
                "key": "routes.json",
                "content_type": "application/json",
                "payload": {"default_backend": "10.0.0.5:8080"},
                "version": 1,
                "updated_at": "2025-06-01T12:34:56Z",
            },
        },
        secrets={
            "tls/server.key": (b"-----BEGIN PRIVATE KEY-----\nexample\n-----END PRIVATE KEY-----\n", 1),
            "db/password": (b"s3cret-p@ssw0rd", 2),
        },
    )


class ControlPlaneSimulator:
    """The control plane of one node, faithful to control-plane.md."""

    app = Klein()

    def __init__(self, node_id: str, token: str, nsk: bytes, record: NodeRecord) -> None:
        self.node_id = node_id
        self.token = token
        self.nsk = nsk
        self.node = record
        self.faults = Faults()
        self.report_posts: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self._port: IListeningPort | None = None
        self._portnum = 0
        self._reactor: Any = None
        self._site: Any = None
        self._box = SecretBox(nsk)

    @classmethod
    def example(cls, token: str = "node-token-example", nsk: bytes | None = None) -> "ControlPlaneSimulator":
        return cls(EXAMPLE_NODE_ID, token, nsk if nsk is not None else os.urandom(32), example_record())

    @property
    def nsk_b64(self) -> str:
        return base64.b64encode(self.nsk).decode("ascii")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._portnum}"

    @property
    def port(self) -> int:
        return self._portnum

    # -- lifecycle -------------------------------------------------------

    async def start(self, reactor: Any, port: int = 0) -> None:
        """Listen on 127.0.0.1 (``port`` 0: any free port, remembered)."""
        self._reactor = reactor
        site = _TrackingSite(self.app.resource())
        self._site = site
        endpoint = endpoints.TCP4ServerEndpoint(reactor, port or self._portnum, interface="127.0.0.1")
        self._port = await endpoint.listen(site)
        self._portnum = self._port.getHost().port

    async def stop(self) -> None:
        """Stop listening (``go down``); ``start`` again comes back on the same port."""
        if self._port is not None:
            port, self._port = self._port, None
            await port.stopListening()
            # Also cut connections the agent holds open (pooled, streams).
            for channel in list(self._site.channels):
                transport = getattr(getattr(channel, "_channel", channel), "transport", None)
                if transport is not None:
                    transport.abortConnection()

    # -- control-plane side changes --------------------------------------

    def set_secret(self, key: str, plaintext: bytes, version: int) -> None:
        self.node.secrets[key] = (plaintext, version)

    def reported(self) -> dict[str, dict[str, Any]]:
        """The reports as the control plane now holds them."""
        return self.node.reports

    # -- request plumbing ------------------------------------------------

    def _check(self, request: IRequest, endpoint: str, node_id: str) -> Any:
        self.requests.append((endpoint, request.method.decode()))
        auth = request.getHeader(b"authorization") or b""
        if auth != b"Bearer " + self.token.encode():
            return self._json(request, {"error": "unauthorized"}, 401)
        if node_id != self.node_id:
            return self._json(request, {"error": "unknown node"}, 404)
        failure = self.faults.failures.get(endpoint)
        if failure is not None and failure.times > 0:
            failure.times -= 1
            if failure.retry_after is not None:
                request.setHeader(b"retry-after", str(failure.retry_after).encode())
            return self._json(request, {"error": "injected failure"}, failure.status)
        return None

    def _json(self, request: IRequest, value: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value).encode()

    async def _delayed(self, value: bytes) -> bytes:
        if self.faults.delay > 0:
            from twisted.internet import task

            await task.deferLater(self._reactor, self.faults.delay, lambda: None)
        return value

    @app.route("/v1/nodes/<node_id>/state", methods=["GET"])
    async def state(self, request: IRequest, node_id: str) -> bytes:
        refused = self._check(request, "state", node_id)
        if refused is not None:
            return refused
        return await self._delayed(self._json(request, self.node.state_document()))

    @app.route("/v1/nodes/<node_id>/secrets/<path:key>", methods=["GET"])
    async def secret(self, request: IRequest, node_id: str, key: str) -> bytes:
        refused = self._check(request, "secret", node_id)
        if refused is not None:
            return refused
        if key not in self.node.secrets:
            return self._json(request, {"error": "not found"}, 404)
        plaintext, version = self.node.secrets[key]
        ciphertext, nonce = self._box.encrypt(plaintext, os.urandom(12))
        if self.faults.tamper_secrets:
            raw = bytearray(base64.b64decode(ciphertext))
            raw[0] ^= 0x01
            ciphertext = base64.b64encode(bytes(raw)).decode()
        body = {"key": key, "ciphertext": ciphertext, "nonce": nonce, "version": version}
        return await self._delayed(self._json(request, body))

    @app.route("/v1/nodes/<node_id>/report", methods=["POST"])
    async def report(self, request: IRequest, node_id: str) -> bytes:
        refused = self._check(request, "report", node_id)
        if refused is not None:
            return refused
        try:
            body = json.loads(request.content.read())
            entries = body["entries"]
            deleted = body["deleted"]
        except (ValueError, KeyError, TypeError):
            return self._json(request, {"error": "bad report body"}, 400)
        self.report_posts.append(body)
        for entry in entries:
            known = self.node.reports.get(entry["key"])
            # A resend of the same (key, version) is a no-op.
            if known is None or known["version"] < entry["version"]:
                self.node.reports[entry["key"]] = entry
        for key in deleted:
            self.node.reports.pop(key, None)
        return await self._delayed(self._json(request, {"ok": True}))

    @app.route("/v1/nodes/<node_id>/heartbeat", methods=["POST"])
    async def heartbeat(self, request: IRequest, node_id: str) -> bytes:
        refused = self._check(request, "heartbeat", node_id)
        if refused is not None:
            return refused
        try:
            body = json.loads(request.content.read())
        except ValueError:
            return self._json(request, {"error": "bad heartbeat body"}, 400)
        self.heartbeats.append(body)
        return await self._delayed(self._json(request, {"reconcile": False}))


class _TrackingSite(server.Site):
    """A Site that remembers its open connections, to cut them on stop."""

    noisy = False

    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.channels: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channels = self.channels
        lost = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            channels.discard(channel)
            lost(reason)

        channel.connectionLost = connection_lost
        channels.add(channel)
        return channel

    def log(self, request: Any) -> None:
        pass
