"""
A control-plane simulator serving plexd's protocol (docs/control-plane.md)
as plexd's own client expects it, or plexsphere's node API
(``protocol="plexsphere"``, docs/control-plane-plexsphere.md), on a real
TCP port, with injectable faults. Importable by users' own tests::

    sim = ControlPlaneSimulator.example()
    await sim.start(reactor)
    ... control_plane.url = sim.url; the bootstrap token: sim.bootstrap_token ...
    sim.faults.fail("state", status=503, times=2, retry_after=1)
    sim.publish("node_state_updated", {"metadata": {...}, "data": [...]})
    await sim.stop()

It issues bootstrap tokens and, at registration, a node id, a 32-character
node secret key (NSK: the bearer of every later call and, as bytes, the
AES-256-GCM key of secrets) and its signing key; ``example()`` also holds
one pre-registered node (``node_id``, ``token``, ``nsk_b64``) for agents
configured with ``control_plane.token_file``. Every node sees one state
(``node``). Events are signed exactly as a Go control plane signs them.
It records what agents sent (``registrations``, ``heartbeats``,
``report_posts``, ``drift_reports``, ``requests``, ``violations``...).

Faults: down (``stop``), ``faults.fail`` (any status, an integer
Retry-After), ``faults.slow``/``delay``, ``faults.hold``,
``faults.tamper_secrets``, ``faults.revoke_bearer()``, gzip answers and a
gzip bomb, heartbeat ``reconcile``/``rotate_keys``, refused report keys;
on the stream: forged events (``inject_event_fault``, ``publish(...,
bad_signature=...)``), cuts mid-event, silence, garbage, an over-long line.

plexsphere mode (plexsphere_sim.py, plexsphere_simstate.py): node ids are
UUIDs, the NSK is 32 random bytes (``nsk_text`` their standard base64) and
``token`` the node's ``nsk_plexd_`` bearer; bootstrap tokens have the
platform's ``psb_`` form and registration checks ``project_id`` and
``resource_handle``. The protocol-neutral operations (``set_metadata``,
``set_data``, ``set_secret``, ``reported``, ``push_state``,
``rotate_signing_key``, ``inject_event_fault``, ``publish``,
``drop_streams``, ``faults``) work in both modes; plexsphere_simstate.py says
how data values and reports read there. Each answer is also handed to
``check_exchange`` (``exchange_checks``).
"""

from __future__ import annotations

import base64
import itertools
import secrets
import uuid
from typing import Any, Callable, Iterable, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IListeningPort
from twisted.web import server
from twisted.web.iweb import IRequest

from plexagent.controlplane import gojson
from plexagent.controlplane.gojson import GoTime
from plexagent.testing import plexsphere_simstate as ps
from plexagent.testing.plexd_sim import PlexdRoutes, frame, plexd_envelope, public_b64
from plexagent.testing.simstate import (
    EXAMPLE_NODE_ID,
    Failure,
    Faults,
    Hold,
    NodeCredentials,
    NodeRecord,
    example_record,
    new_nsk,
)

__all__ = ["ControlPlaneSimulator", "EXAMPLE_NODE_ID", "EventStreamResponse", "Failure", "Faults", "Hold",
           "NodeCredentials", "NodeRecord", "example_record"]

#: Called on every event stream opened: (simulator, stream, node).
StreamHook = Callable[["ControlPlaneSimulator", "EventStreamResponse", NodeCredentials], None]
#: Checks one answered request (plexsphere): (endpoint, method, path and query, request headers (lowercase
#: names), request body, status, response headers, response body) -> what is wrong with it.
ExchangeCheck = Callable[[str, str, str, dict[str, str], bytes, int, dict[str, str], bytes], Iterable[str]]
PROTOCOLS = ("plexd", "plexsphere")


class ControlPlaneSimulator:
    """A control plane for plexd nodes (or plexsphere's), faithful to its protocol's document."""

    def __init__(self, record: NodeRecord | None = None, *, protocol: str = "plexd",
                 node_id: str = EXAMPLE_NODE_ID, nsk_text: str | None = None,
                 bootstrap_tokens: list[str] | None = None, tokens: int = 1,
                 signing_key: Ed25519PrivateKey | None = None, keepalive: float = 15.0,
                 project_id: str = ps.EXAMPLE_PROJECT_ID, resource_handle: str = ps.EXAMPLE_RESOURCE_HANDLE,
                 der_signing_key: bool = False) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"the simulator serves the protocols {', '.join(PROTOCOLS)}, not {protocol!r}")
        self.protocol = protocol
        self.plexsphere = protocol == "plexsphere"
        #: plexsphere: what registration must name
        self.project_id = project_id
        self.resource_handle = resource_handle
        #: plexsphere: registration sends the signing key in its 44-byte DER form
        self.der_signing_key = der_signing_key
        self.node = record if record is not None else NodeRecord()
        self.faults = Faults()
        if self.plexsphere:
            node_id = ps.EXAMPLE_NODE_UUID if node_id == EXAMPLE_NODE_ID else node_id
            nsk_text = nsk_text or ps.new_nsk_b64()
        self.example_node = NodeCredentials(node_id, nsk_text or new_nsk(), mesh_ip="10.99.0.1")
        self.nodes: dict[str, NodeCredentials] = {node_id: self.example_node}
        self._current = self.example_node
        self._node_numbers = itertools.count(1)
        #: bootstrap token -> registrations it still allows
        self._tokens: dict[str, int] = {}
        self.bootstrap_tokens: list[str] = []
        for given in bootstrap_tokens if bootstrap_tokens is not None else ["" for _ in range(tokens)]:
            self.issue_bootstrap_token(token=given or None)
        self.signing_key = signing_key or Ed25519PrivateKey.generate()
        self.previous_key: Ed25519PrivateKey | None = None
        #: the keys' ids (plexsphere's events name the key that signed them)
        self._key_numbers = itertools.count(1)
        self.signing_key_id = ps.key_id(next(self._key_numbers))
        self.previous_key_id = ""
        #: when the previous key stops verifying (seconds since the epoch)
        self.transition_expires: float | None = None
        self.keepalive = keepalive
        # records
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[Any] = []
        #: accepted report batches, lists normalised (null -> [])
        self.report_posts: list[dict[str, Any]] = []
        #: accepted report batches exactly as sent (null kept)
        self.raw_report_posts: list[Any] = []
        self.refused_report_posts: list[Any] = []
        self.drift_reports: list[Any] = []
        self.deregistrations: list[str] = []
        #: what the simulator found wrong in what an agent sent
        self.violations: list[str] = []
        self.requests: list[tuple[str, str]] = []
        #: (reactor time, endpoint) of every request
        self.request_times: list[tuple[float, str]] = []
        #: the Last-Event-ID of every stream request ("" when absent)
        self.stream_requests: list[str] = []
        #: every event published: (event id, SSE frame)
        self.events: list[tuple[str, bytes]] = []
        self.stream_hooks: list[StreamHook] = []
        #: called after each registration is answered: (simulator, node)
        self.registration_hooks: list[Callable[["ControlPlaneSimulator", NodeCredentials], None]] = []
        #: plexsphere: every registration body received (None when not JSON), accepted or not
        self.registration_attempts: list[Any] = []
        self.registration_nonces: set[str] = set()
        #: plexsphere: every report call, in order: (method, key, value or None)
        self.report_calls: list[tuple[str, str, str | None]] = []
        #: plexsphere: every keys/rotate body: {"node_id", "new_public_key"}
        self.key_rotations: list[dict[str, str]] = []
        #: plexsphere: every event published, for Last-Event-ID replays
        self.published: list[ps.PublishedEvent] = []
        #: plexsphere: older secret versions, name -> version -> plaintext
        self.secret_history: dict[str, dict[int, bytes]] = {}
        #: plexsphere: the snapshot's ``state`` (and ``reports``) is null
        self.null_state = False
        self.policy_revision = str(uuid.uuid4())
        self.exchange_checks: list[ExchangeCheck] = []
        self._streams: list[EventStreamResponse] = []
        self._event_ids = itertools.count(1)
        self._last_nonce = ""
        self._routes: Any = PlexdRoutes(self)
        if self.plexsphere:
            from plexagent.testing.plexsphere_sim import PlexsphereRoutes

            self._routes = PlexsphereRoutes(self)
        self._port: IListeningPort | None = None
        self._portnum = 0
        self._host = "127.0.0.1"
        self._reactor: Any = None
        self._site: Any = None
        self.started_at = self.now()

    @classmethod
    def example(cls, protocol: str = "plexd", **options: Any) -> "ControlPlaneSimulator":
        """The guide's example node, pre-registered, and one bootstrap token for enrolling."""
        return cls(example_record(protocol), protocol=protocol, **options)

    # -- credentials -------------------------------------------------------

    @property
    def node_id(self) -> str:
        """The current node: the last one registered, else the pre-registered one."""
        return self._current.node_id

    @property
    def token(self) -> str:
        """The current node's bearer: its NSK text (plexsphere: its ``nsk_plexd_`` bearer)."""
        if self.plexsphere:
            return ps.bearer(self._current.node_id, self.nsk)
        return self._current.nsk_text

    @property
    def nsk(self) -> bytes:
        """The current node's AES key (its NSK's bytes)."""
        return self.nsk_of(self._current)

    def nsk_of(self, node: NodeCredentials) -> bytes:
        """A node's AES key: plexd's NSK text as bytes, plexsphere's the 32 bytes its base64 says."""
        return base64.b64decode(node.nsk_text) if self.plexsphere else node.nsk_text.encode()

    @property
    def bootstrap_uses(self) -> dict[str, int]:
        """Bootstrap token -> registrations it still allows."""
        return self._tokens

    @property
    def nsk_b64(self) -> str:
        return base64.b64encode(self.nsk).decode("ascii")

    @property
    def bootstrap_token(self) -> str:
        return self.bootstrap_tokens[0]

    @property
    def public_key_b64(self) -> str:
        return public_b64(self.signing_key)

    @property
    def signing_public_key_wire(self) -> str:
        """The signing key as registration sends it: raw, or its DER form with ``der_signing_key``."""
        if not self.der_signing_key:
            return self.public_key_b64
        from plexagent.controlplane.keys import ED25519_SPKI_PREFIX

        return base64.b64encode(ED25519_SPKI_PREFIX + base64.b64decode(self.public_key_b64)).decode("ascii")

    def issue_bootstrap_token(self, uses: int = 1, token: str | None = None) -> str:
        if token is None and self.plexsphere:
            token = ps.new_bootstrap_token(self.project_id)
        token = token or secrets.token_urlsafe(32)
        self._tokens[token] = uses
        self.bootstrap_tokens.append(token)
        return token

    def use_bootstrap_token(self, token: str) -> bool:
        left = self._tokens.get(token, 0)
        if left <= 0:
            return False
        self._tokens[token] = left - 1
        return True

    def register_node(self, public_key: str) -> NodeCredentials:
        number = next(self._node_numbers)
        if self.plexsphere:
            node_id, nsk_text = str(uuid.uuid4()), ps.new_nsk_b64()
        else:
            node_id, nsk_text = f"node-{number}", new_nsk()
        node = NodeCredentials(node_id, nsk_text, mesh_ip=f"10.99.1.{number % 250 + 1}", public_key=public_key)
        self.nodes[node.node_id] = node
        self._current = node
        return node

    def signing_keys_document(self) -> dict[str, str]:
        doc = {"current": self.public_key_b64}
        if self.previous_key is not None:
            doc["previous"] = public_b64(self.previous_key)
            if self.transition_expires is not None:
                doc["transition_expires"] = self._go_time(self.transition_expires)
        return doc

    # -- lifecycle ---------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._portnum}"

    @property
    def port(self) -> int:
        return self._portnum

    def now(self) -> float:
        import time

        return cast(float, self._reactor.seconds()) if self._reactor is not None else time.time()

    def _go_time(self, seconds: float) -> str:
        return GoTime.from_unix_ns(round(seconds * 1e9)).marshal().decode("ascii")

    go_time = _go_time

    async def start(self, reactor: Any, port: int = 0, host: str = "127.0.0.1") -> None:
        """Listen on ``host`` (``port`` 0: any free port, kept for the next start)."""
        if self._reactor is None:
            self.started_at = cast(float, reactor.seconds())
        self._reactor = reactor
        self._host = host
        site = _TrackingSite(self._routes.resource())
        self._site = site
        endpoint = endpoints.TCP4ServerEndpoint(reactor, port or self._portnum, interface=host)
        self._port = await endpoint.listen(site)
        self._portnum = cast(Any, self._port.getHost()).port

    async def stop(self) -> None:
        """Go down: stop listening and cut every connection; ``start`` comes back on the same port."""
        for stream in list(self._streams):
            stream.close()
        if self._port is not None:
            port, self._port = self._port, None
            await defer.maybeDeferred(port.stopListening)
            for channel in list(self._site.channels):
                inner = getattr(channel, "_channel", channel)
                transport = getattr(inner, "transport", None)
                if transport is not None:
                    transport.abortConnection()

    # -- request plumbing (for the protocol's routes) ---------------------------

    def record_request(self, request: IRequest, endpoint: str) -> None:
        self.requests.append((endpoint, request.method.decode()))
        self.request_times.append((self.now(), endpoint))

    async def delayed(self, value: bytes, endpoint: str = "") -> bytes:
        delay = self.faults.delay + self.faults.delays.get(endpoint, 0.0)
        if delay > 0:
            await task.deferLater(self._reactor, delay, lambda: None)
        hold = self.faults.holds.get(endpoint)
        if hold is not None:
            await hold.wait(endpoint)
        return value

    def check_exchange(self, endpoint: str, method: str, path: str, request_headers: dict[str, str],
                       request_body: bytes, status: int, response_headers: dict[str, str],
                       response_body: bytes) -> None:
        """Run every ``exchange_checks`` callable on one answered request; what they return are violations."""
        for check in list(self.exchange_checks):
            self.violations.extend(check(endpoint, method, path, request_headers, request_body, status,
                                         response_headers, response_body))

    def open_stream(self, request: IRequest, node: NodeCredentials) -> Any:
        last_id = (request.getHeader(b"last-event-id") or b"").decode("utf-8", "replace")
        self.stream_requests.append(last_id)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        opening = b": stream open\n\n"
        if last_id:
            ids = [eid for eid, _ in self.events]
            if last_id in ids:
                opening += b"".join(f for _, f in self.events[ids.index(last_id) + 1:])
        return self.start_stream(request, node, opening)

    def start_stream(self, request: IRequest, node: NodeCredentials, opening: bytes) -> Any:
        """Keep ``request`` open as ``node``'s event stream, ``opening`` its first bytes; fires when it ends."""
        node.streams += 1
        stream = EventStreamResponse(self, request, node)
        self._streams.append(stream)
        delay = self.faults.delay + self.faults.delays.get("events", 0.0)
        if delay > 0:
            # Slow: no response headers until the delay has passed.
            stream.pending = self._reactor.callLater(delay, stream.send, opening, True)
        else:
            stream.send(opening, force=True)
        for hook in list(self.stream_hooks):
            hook(self, stream, node)
        return stream.done

    # -- the control plane's side ----------------------------------------------

    def reported(self) -> dict[str, dict[str, Any]]:
        """The reports as the control plane now holds them."""
        return self.node.reports

    def set_metadata(self, metadata: dict[str, str]) -> None:
        self.node.metadata = dict(metadata)

    def set_data(self, key: str, payload: Any, version: int, content_type: str = "application/json") -> None:
        self.node.data[key] = {"key": key, "content_type": content_type, "payload": payload, "version": version,
                               "updated_at": self._go_time(self.now())}

    def set_secret(self, key: str, plaintext: bytes, version: int) -> None:
        """Hold ``plaintext`` as version ``version`` of ``key`` (the one it replaces stays fetchable by version)."""
        if key in self.node.secrets:
            old, old_version = self.node.secrets[key]
            self.secret_history.setdefault(key, {})[old_version] = old
        self.node.secrets[key] = (plaintext, version)

    def push_state(self, key: str = "current") -> str:
        """
        Tell the nodes of the state now held (a signed ``node_state_updated``),
        signed with the ``current`` or the ``previous`` signing key.
        """
        signer = self.previous_key if key == "previous" else None
        if self.plexsphere:
            return self.publish("node_state_updated", {"node_id": self.node_id}, apply=False, sign_with=signer,
                                key_id=self.previous_key_id if key == "previous" else None)
        doc = self.node.state_document()
        return self.publish("node_state_updated", {"metadata": doc["metadata"], "data": doc["data"]}, apply=False,
                            sign_with=signer)

    def push_secret_index(self) -> str:
        return self.publish("node_secrets_updated", {"secret_refs": self.node.state_document()["secret_refs"]})

    def rotate_signing_key(self, via: str = "event", transition: float = 3600.0) -> str:
        """
        Sign with a new key from now on; the old one stays valid for
        ``transition`` seconds. ``via``: "event" (a ``signing_key_rotated``
        signed with the old key), "state" (only the next state fetch names
        it) or "both". Returns the new public key.
        """
        new = Ed25519PrivateKey.generate()
        self.previous_key, self.signing_key = self.signing_key, new
        self.previous_key_id, self.signing_key_id = self.signing_key_id, ps.key_id(next(self._key_numbers))
        self.transition_expires = self.now() + transition
        if self.plexsphere:
            # The snapshot names no keys: "state" alone changes the key unannounced.
            if via in ("event", "both"):
                self.publish("signing_key_rotated", {
                    "key_id": self.signing_key_id, "public_key": self.public_key_b64,
                    "previous_key_id": self.previous_key_id, "transition_expires": self._go_time(
                        self.transition_expires)}, sign_with=self.previous_key, key_id=self.previous_key_id)
            return self.public_key_b64
        if via in ("event", "both"):
            keys = self.signing_keys_document()
            self.publish("signing_key_rotated", keys, sign_with=self.previous_key)
        return self.public_key_b64

    def inject_event_fault(self, kind: str) -> str:
        """
        Publish a forged ``node_state_updated`` that must be dropped (its
        metadata says ``{"forged": "yes"}``): bad_signature,
        missing_signature, stale, future, unknown_key, malformed, replay.
        plexsphere (no replay): the payload is ``{"forged": "yes"}`` and the
        state stays as it is; unknown_key names a key id the agent does not
        hold (signed by a key nobody holds).
        """
        if self.plexsphere:
            options = dict(ps.FORGERIES[kind])
            if kind == "unknown_key":
                options["sign_with"] = Ed25519PrivateKey.generate()
            return self.publish("node_state_updated", {"forged": "yes"}, apply=False, **options)
        forged = {"metadata": {"forged": "yes"}, "data": []}
        faults: dict[str, dict[str, Any]] = {
            "bad_signature": {"bad_signature": True}, "missing_signature": {"signature": ""},
            "stale": {"issued_offset": -301.0}, "future": {"issued_offset": 301.0},
            "unknown_key": {"sign_with": Ed25519PrivateKey.generate()}, "replay": {"replay_nonce": True},
            "malformed": {"raw_data": b'{"event_type":"node_state_updated","event_id":'},
        }
        options = faults[kind]
        return self.publish("node_state_updated", forged, apply=False, **options)

    # -- the event stream ----------------------------------------------------

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def publish(self, event_type: str, payload: Any = None, *, payload_raw: bytes | None = None,
                apply: bool = True, issued_offset: float = 0.0, issued: GoTime | None = None,
                wire_issued_at: bytes | None = None,
                nonce: str | None = None, replay_nonce: bool = False, sign_with: Ed25519PrivateKey | None = None,
                bad_signature: bool = False, signature: str | None = None, raw_data: bytes | None = None,
                key_id: str | None = None) -> str:
        """
        Send one signed event to every open stream (kept for Last-Event-ID
        replays); returns its id. ``payload`` is written as Go marshals it
        (``payload_raw``: these bytes instead). With ``apply`` a
        ``node_state_updated`` also changes what a state fetch answers.
        Forgeries: see ``plexd_envelope``; ``replay_nonce`` reuses the last
        nonce; ``raw_data`` sends those bytes as the event's data.
        plexsphere: the id is the event's numeric sequence; each node's
        frame is signed for its own scope; ``key_id`` names another key
        (default: the current key's id); a ``rotate_keys`` event makes a
        node key rotation pending for every node.
        """
        if self.plexsphere:
            return ps.publish(self, event_type, payload, payload_raw=payload_raw, apply=apply,
                              issued_offset=issued_offset, issued=issued, sign_with=sign_with,
                              bad_signature=bad_signature, signature=signature, raw_data=raw_data, key_id=key_id)
        event_id = str(next(self._event_ids))
        if raw_data is not None:
            wire = raw_data
        else:
            if payload_raw is None:
                payload_raw = gojson.marshal(payload)
            wire, nonce = plexd_envelope(self, event_type, event_id, payload_raw, issued_offset=issued_offset,
                                         issued=issued, wire_issued_at=wire_issued_at,
                                         nonce=self._last_nonce if replay_nonce else nonce, sign_with=sign_with,
                                         bad_signature=bad_signature, signature=signature)
            self._last_nonce = nonce
        if apply and event_type == "node_state_updated" and isinstance(payload, dict):
            self.node.metadata = dict(payload.get("metadata") or {})
            self.node.data = {e["key"]: e for e in payload.get("data") or []}
        data = frame(event_id, event_type, wire)
        self.events.append((event_id, data))
        for stream in list(self._streams):
            stream.send(data)
        return event_id

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` as is to every open stream."""
        for stream in list(self._streams):
            stream.send(data)

    def send_garbage(self) -> None:
        """Lines no event-stream parser should choke on, ending in a blank line."""
        self.send_raw(
            b"garbage without a colon\n"
            b"\xff\xfe\x00 binary \x80\x81\n"
            b"unknownfield: value\r\n"
            b"retry: not-a-number\n"
            b"data: {not json at all\n"
            b"\n"
            b"event: node_state_updated\ndata: {\"event_type\": 1}\n\n"
            + b"x" * 5000 + b"\n\n"
        )

    def send_overlong_line(self) -> None:
        """A line longer than plexd's parser takes (65535 bytes): the stream must end."""
        self.send_raw(b"data: " + b"x" * 70000 + b"\n\n")

    def drop_streams(self, mid_event: bool = False) -> None:
        """Cut every open stream, after half an event when ``mid_event``."""
        half = b'data: {"id":"' if self.plexsphere else b'data: {"event_type":"node_st'
        for stream in list(self._streams):
            if mid_event:
                stream.send(b"id: 999999\nevent: node_state_updated\n" + half)
            stream.close()


class EventStreamResponse:
    """One open event-stream response, with its keep-alive timer."""

    def __init__(self, sim: ControlPlaneSimulator, request: Any, node: NodeCredentials | None = None) -> None:
        self._sim = sim
        self._request = request
        self.node = node
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._gone())
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = sim._reactor
        self._keepalive.start(sim.keepalive, now=False)
        self.pending: Any = None
        request.notifyFinish().addBoth(lambda _: self._gone())

    def _ping(self) -> None:
        self.send(b":keep-alive\n\n" if self._sim.plexsphere else b": keep-alive\n\n")

    def send(self, data: bytes, force: bool = False) -> None:
        if self._sim.faults.silent_stream and not force:
            return
        if self in self._sim._streams:
            self._request.write(data)

    def end(self) -> None:
        """End the response cleanly (the body is complete)."""
        if self in self._sim._streams:
            self._gone()
            self._request.finish()

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
