"""
A control-plane simulator that follows ``docs/control-plane.md``, on a real
TCP port, with injectable faults.

Importable by users' own tests::

    sim = ControlPlaneSimulator.example()
    await sim.start(reactor)
    ... config control_plane.url = sim.url, node.id = sim.node_id ...
    sim.faults.fail("state", status=503, times=2, retry_after=1)
    await sim.stop()

It records what the agent sent (``reports``, ``heartbeats``, ``requests``)
so tests can assert on it.

The event stream (``GET /v1/nodes/{id}/events``) is served as SSE; tests
push events with ``publish(event_type, payload)``, which signs the envelope
when the simulator was given an Ed25519 private key (``signing_key``) and,
for ``node_state_updated``, also changes what a state fetch answers, as a
real control plane would. Stream faults:
``publish(..., bad_signature=True | issued_at=... | nonce=...)``,
``drop_streams(mid_event=True)``, ``send_garbage()``, ``faults.silent_stream``;
other faults: ``faults.fail(...)``, ``faults.slow(endpoint, seconds)``,
``faults.heartbeat_reconcile``, ``faults.refuse_report_key(key, status)``
(refuse, applying nothing, every report batch that holds that key),
``faults.hold(endpoint)`` (answer only when the test says so).

Like a real control plane it refuses (400) a report body that is not strict
JSON: NaN, Infinity or a lone surrogate.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import os
from typing import Any, cast

import attrs
from klein import Klein
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IListeningPort
from twisted.web import server
from twisted.web.iweb import IRequest

from plexagent.controlplane.events import sign_envelope
from plexagent.fileio import decode_json
from plexagent.node.secrets import SecretBox

EXAMPLE_NODE_ID = "edge-us-west-42"


@attrs.define
class Failure:
    status: int
    times: int
    retry_after: float | None = None


class Hold:
    """
    Requests to one endpoint wait until ``release()``; ``arrived`` fires
    (with the endpoint name) when the first of them has come in.
    """

    def __init__(self) -> None:
        self.arrived: defer.Deferred[str] = defer.Deferred()
        self._released = False
        self._waiting: list[defer.Deferred[None]] = []

    def wait(self, endpoint: str) -> defer.Deferred[None]:
        if not self.arrived.called:
            self.arrived.callback(endpoint)
        if self._released:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    def release(self) -> None:
        self._released = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


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
    #: per endpoint name: seconds to wait before answering (beside ``delay``)
    delays: dict[str, float] = attrs.field(factory=dict)
    #: answer the next this-many heartbeats with ``{"reconcile": true}``
    heartbeat_reconcile: int = 0
    #: the event stream sends nothing at all, not even keep-alives
    silent_stream: bool = False
    #: report keys whose batches are refused with the given status
    refused_report_keys: dict[str, int] = attrs.field(factory=dict)
    #: per endpoint name: requests wait for the test to release them
    holds: dict[str, Hold] = attrs.field(factory=dict)

    def fail(self, endpoint: str, status: int = 503, times: int = 1, retry_after: float | None = None) -> None:
        self.failures[endpoint] = Failure(status, times, retry_after)

    def slow(self, endpoint: str, seconds: float) -> None:
        """Answer requests to ``endpoint`` only after ``seconds``."""
        self.delays[endpoint] = seconds

    def refuse_report_key(self, key: str, status: int = 400) -> None:
        """Refuse (``status``, applying nothing) every report batch holding ``key``, written or deleted."""
        self.refused_report_keys[key] = status

    def hold(self, endpoint: str) -> Hold:
        """Keep requests to ``endpoint`` waiting until the returned hold is released."""
        hold = self.holds[endpoint] = Hold()
        return hold

    def clear(self) -> None:
        self.refused_report_keys.clear()
        self.delay = 0.0
        self.failures.clear()
        self.tamper_secrets = False
        self.delays.clear()
        self.heartbeat_reconcile = 0
        self.silent_stream = False
        for hold in self.holds.values():
            hold.release()
        self.holds.clear()


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

    def __init__(
        self,
        node_id: str,
        token: str,
        nsk: bytes,
        record: NodeRecord,
        signing_key: Any = None,
        keepalive: float = 15.0,
        stream_retry_ms: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.token = token
        self.nsk = nsk
        self.node = record
        self.faults = Faults()
        self.report_posts: list[dict[str, Any]] = []
        #: report batches refused because of ``faults.refuse_report_key``
        self.refused_report_posts: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        #: (reactor time, endpoint) of every request, for timing assertions
        self.request_times: list[tuple[float, str]] = []
        self._port: IListeningPort | None = None
        self._portnum = 0
        self._reactor: Any = None
        self._site: Any = None
        self._box = SecretBox(nsk)
        #: Ed25519PrivateKey signing envelopes (None: envelopes unsigned)
        self.signing_key = signing_key
        #: seconds between keep-alive comments on open streams
        self.keepalive = keepalive
        #: ``retry:`` (ms) announced at the start of every stream
        self.stream_retry_ms = stream_retry_ms
        #: every event published: (event_id, SSE frame bytes)
        self.events: list[tuple[str, bytes]] = []
        #: the Last-Event-ID header of every stream request ("" when absent)
        self.stream_requests: list[str] = []
        self._streams: list[_EventStream] = []
        self._event_ids = itertools.count(1)
        self._last_nonce = ""

    @classmethod
    def example(
        cls, token: str = "node-token-example", nsk: bytes | None = None, **options: Any
    ) -> "ControlPlaneSimulator":
        return cls(EXAMPLE_NODE_ID, token, nsk if nsk is not None else os.urandom(32), example_record(), **options)

    @property
    def public_key_b64(self) -> str:
        """The signing key's public half as control_plane.signing_public_key wants it."""
        from cryptography.hazmat.primitives import serialization

        raw = self.signing_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode("ascii")

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
        self._portnum = cast(Any, self._port.getHost()).port

    async def stop(self) -> None:
        """Stop listening (``go down``); ``start`` again comes back on the same port."""
        for stream in list(self._streams):
            stream.close()
        if self._port is not None:
            port, self._port = self._port, None
            await defer.maybeDeferred(port.stopListening)
            # Also cut connections the agent holds open (pooled, streams).
            for channel in list(self._site.channels):
                # Site builds a protocol that wraps the HTTP channel; the
                # transport is on the inner one.
                inner = getattr(channel, "_channel", channel)
                transport = getattr(inner, "transport", None)
                if transport is not None:
                    transport.abortConnection()

    # -- control-plane side changes --------------------------------------

    def set_secret(self, key: str, plaintext: bytes, version: int) -> None:
        self.node.secrets[key] = (plaintext, version)

    def reported(self) -> dict[str, dict[str, Any]]:
        """The reports as the control plane now holds them."""
        return self.node.reports

    # -- the event stream ------------------------------------------------

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _now(self) -> float:
        import time

        return self._reactor.seconds() if self._reactor is not None else time.time()

    def issued_at(self, offset: float = 0.0) -> str:
        """An RFC 3339 timestamp ``offset`` seconds from now (by the simulator's reactor)."""
        moment = datetime.datetime.fromtimestamp(self._now() + offset, datetime.timezone.utc)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def publish(
        self,
        event_type: str,
        payload: dict[str, Any],
        *,
        apply: bool = True,
        issued_at: str | None = None,
        nonce: str | None = None,
        replay_nonce: bool = False,
        bad_signature: bool = False,
    ) -> str:
        """
        Send one event to every open stream (and keep it for Last-Event-ID
        replays); returns its event id. With ``apply`` a
        ``node_state_updated`` event also changes what a state fetch answers. ``issued_at``,
        ``nonce``/``replay_nonce`` and ``bad_signature`` forge faulty
        envelopes.
        """
        event_id = str(next(self._event_ids))
        if replay_nonce:
            nonce = self._last_nonce
        nonce = nonce if nonce is not None else base64.b64encode(os.urandom(16)).decode("ascii")
        self._last_nonce = nonce
        issued_at = issued_at if issued_at is not None else self.issued_at()
        if self.signing_key is not None:
            envelope = sign_envelope(self.signing_key, event_type, event_id, issued_at, nonce, payload)
        else:
            envelope = {"event_type": event_type, "event_id": event_id, "issued_at": issued_at,
                        "nonce": nonce, "payload": payload, "signature": ""}
        if bad_signature:
            raw = bytearray(base64.b64decode(envelope["signature"]) or b"\0" * 64)
            raw[0] ^= 0x01
            envelope["signature"] = base64.b64encode(bytes(raw)).decode("ascii")
        if apply and event_type == "node_state_updated":
            self.node.metadata = dict(payload["metadata"])
            self.node.data = {e["key"]: e for e in payload["data"]}
        frame = (
            f"id: {event_id}\nevent: {event_type}\ndata: "
            + json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))
            + "\n\n"
        ).encode("utf-8")
        self.events.append((event_id, frame))
        for stream in list(self._streams):
            stream.send(frame)
        return event_id

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` as is to every open stream."""
        for stream in list(self._streams):
            stream.send(data)

    def send_garbage(self) -> None:
        """Lines no event-stream parser should choke on, ending in a blank line."""
        self.send_raw(
            b"garbage without a colon\r\n"
            b"\xff\xfe\x00 binary \x80\x81\n"
            b"unknownfield: value\r"
            b"retry: not-a-number\n"
            b"data: {not json at all\n"
            b"\n"
            b"event: node_state_updated\ndata: {\"event_type\": 1}\n\n"
            + b"x" * 5000 + b"\n\n"
        )

    def drop_streams(self, mid_event: bool = False) -> None:
        """Cut every open stream, after half an event when ``mid_event``."""
        for stream in list(self._streams):
            if mid_event:
                stream.send(b"id: 999999\nevent: node_state_updated\ndata: {\"event_type\":\"node_st")
            stream.close()

    # -- request plumbing ------------------------------------------------

    def _check(self, request: IRequest, endpoint: str, node_id: str) -> Any:
        self.requests.append((endpoint, request.method.decode()))
        self.request_times.append((self._now(), endpoint))
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

    async def _delayed(self, value: bytes, endpoint: str = "") -> bytes:
        delay = self.faults.delay + self.faults.delays.get(endpoint, 0.0)
        if delay > 0:
            await task.deferLater(self._reactor, delay, lambda: None)
        hold = self.faults.holds.get(endpoint)
        if hold is not None:
            await hold.wait(endpoint)
        return value

    @app.route("/v1/nodes/<node_id>/state", methods=["GET"])
    async def state(self, request: IRequest, node_id: str) -> bytes:
        refused = self._check(request, "state", node_id)
        if refused is not None:
            return refused
        return await self._delayed(self._json(request, self.node.state_document()), "state")

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
        return await self._delayed(self._json(request, body), "secret")

    @app.route("/v1/nodes/<node_id>/report", methods=["POST"])
    async def report(self, request: IRequest, node_id: str) -> bytes:
        refused = self._check(request, "report", node_id)
        if refused is not None:
            return refused
        try:
            body = decode_json(request.content.read())
            entries = body["entries"] or []
            deleted = body["deleted"] or []
            keys = [entry["key"] for entry in entries] + list(deleted)
        except (ValueError, KeyError, TypeError):
            return self._json(request, {"error": "bad report body"}, 400)
        poisoned = [k for k in keys if k in self.faults.refused_report_keys]
        if poisoned:
            self.refused_report_posts.append(body)
            return self._json(request, {"error": f"report {poisoned[0]} refused"},
                              self.faults.refused_report_keys[poisoned[0]])
        self.report_posts.append(body)
        for entry in entries:
            known = self.node.reports.get(entry["key"])
            # A resend of the same (key, version) is a no-op.
            if known is None or known["version"] < entry["version"]:
                self.node.reports[entry["key"]] = entry
        for key in deleted:
            self.node.reports.pop(key, None)
        return await self._delayed(self._json(request, {"ok": True}), "report")

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
        reconcile = self.faults.heartbeat_reconcile > 0
        if reconcile:
            self.faults.heartbeat_reconcile -= 1
        return await self._delayed(self._json(request, {"reconcile": reconcile}), "heartbeat")

    @app.route("/v1/nodes/<node_id>/events", methods=["GET"])
    def events_stream(self, request: IRequest, node_id: str) -> Any:
        refused = self._check(request, "events", node_id)
        if refused is not None:
            return refused
        last_id = (request.getHeader(b"last-event-id") or b"").decode("utf-8", "replace")
        self.stream_requests.append(last_id)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        stream = _EventStream(self, request)
        self._streams.append(stream)
        opening = b": stream open\n\n"
        if self.stream_retry_ms is not None:
            opening += f"retry: {self.stream_retry_ms}\n\n".encode()
        if last_id:
            ids = [eid for eid, _ in self.events]
            if last_id in ids:
                opening += b"".join(frame for _, frame in self.events[ids.index(last_id) + 1:])
        delay = self.faults.delay + self.faults.delays.get("events", 0.0)
        if delay > 0:
            # Slow: no response headers until the delay has passed.
            stream.pending = self._reactor.callLater(delay, stream.send, opening, True)
        else:
            stream.send(opening, force=True)
        return stream.done


class _EventStream:
    """One open event-stream response, with its keep-alive timer."""

    def __init__(self, sim: ControlPlaneSimulator, request: Any) -> None:
        self._sim = sim
        self._request = request
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._gone())
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = sim._reactor
        self._keepalive.start(sim.keepalive, now=False)
        self.pending: Any = None
        request.notifyFinish().addBoth(lambda _: self._gone())

    def _ping(self) -> None:
        self.send(b": keep-alive\n\n")

    def send(self, data: bytes, force: bool = False) -> None:
        if self._sim.faults.silent_stream and not force:
            return
        if self in self._sim._streams:
            self._request.write(data)

    def close(self) -> None:
        """Cut the connection (as a crash or a network drop would)."""
        transport = self._request.channel.transport if self._request.channel else None
        self._gone()
        if transport is not None:
            transport.abortConnection()

    def _gone(self) -> None:
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        if self in self._sim._streams:
            self._sim._streams.remove(self)
        if self._keepalive.running:
            self._keepalive.stop()


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
