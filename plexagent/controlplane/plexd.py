"""
plexd's control-plane protocol (docs/control-plane.md): enrollment with a
bootstrap token, then every call of the node under ``/v1/nodes/{id}/`` with
the node secret key (NSK) as bearer, as plexd's own client makes them.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable, Mapping

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from plexagent import errors
from plexagent.controlplane import gojson
from plexagent.controlplane.build import BuildChecksum
from plexagent.controlplane.client import Reply, Transport, discard_body, json_object, path_escape
from plexagent.controlplane.delivery import deliver_batch
from plexagent.controlplane.identity import NodeKeyPair
from plexagent.controlplane.keys import KeySet
from plexagent.controlplane.plexd_events import SIGNING_KEYS, PlexdEventCodec
from plexagent.controlplane.protocol import (
    AuthFailurePolicy,
    Call,
    ControlPlaneError,
    ErrorKind,
    FetchedState,
    HeartbeatAnswer,
    Identity,
    PullState,
    SecretQuery,
    SecretValue,
    SetAside,
)
from plexagent.node.reports import Changes
from plexagent.node.secrets import DecryptionFailed, SecretBox, aes_key_from_nsk
from plexagent.node.state import InvalidState, NodeState, parse_data_entries, parse_metadata, parse_secret_refs

log = Logger()

NAME = "plexd"

#: statuses that end a registration attempt for good (plexd's registrar)
_REGISTER_PERMANENT = frozenset({400, 401, 403, 404, 409})
#: 4xx answers to a report that say nothing about the changes sent
_NOT_A_REFUSAL = frozenset({401, 403, 404, 407, 408, 425, 429})


def classify(call: Call, reply: Reply) -> ControlPlaneError:
    """What a non-2xx answer to ``call`` means, as plexd's client (and the agent's rules) take it."""
    status = reply.status
    # Retry-After is a floor on 429 (plexd) and on 503 (the agent's rule).
    retry_after = reply.retry_after if status in (429, 503) else None
    message = f"{call.value}: control plane answered {status}"
    if call is Call.REGISTER and status in _REGISTER_PERMANENT:
        kind = ErrorKind.PERMANENT
    elif status == 401:
        kind = ErrorKind.AUTH
    elif status == 429:
        kind = ErrorKind.RATE_LIMITED
    elif call is Call.SECRET and status == 404:
        kind = ErrorKind.NOT_FOUND
    elif call is Call.REPORT and 400 <= status < 500 and status not in _NOT_A_REFUSAL:
        kind = ErrorKind.REFUSED
    else:
        kind = ErrorKind.TRANSIENT
    return ControlPlaneError(call, kind, message, status=status, retry_after=retry_after)


def _checked(call: Call, reply: Reply) -> Reply:
    if not 200 <= reply.status < 300:
        raise classify(call, reply)
    return reply


def _succeeded(call: Call, reply: Reply) -> None:
    """Any 2xx, whatever its body (report, drift, deregister)."""
    _checked(call, reply)


def encode_body(value: Any) -> bytes:
    """A request body as Go writes it: compact, ``< > &`` and U+2028/9 escaped, UTF-8."""
    return gojson.escape_html(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


_PRINTABLE = frozenset(range(0x20, 0x7F))


def _header_safe(text: str) -> bool:
    return bool(text) and all(ord(c) in _PRINTABLE for c in text)


@attrs.frozen
class _Facts:
    """What drift compares between two fetches (plexd's reconcile diff)."""

    keys: tuple[str, str] | None
    metadata: Mapping[str, str]
    data: Mapping[str, int]
    secret_refs: Mapping[str, int]


EMPTY_FACTS = _Facts(None, {}, {}, {})


class PlexdSession:
    """The calls of one enrolled plexd node."""

    def __init__(self, transport: Transport, identity: Identity, clock: IReactorTime,
                 checksum: Callable[[], defer.Deferred[str]]) -> None:
        self.transport = transport
        self.identity = identity
        self.node_id = identity.node_id
        self.clock = clock
        self._checksum = checksum
        self._prefix = "/v1/nodes/" + path_escape(identity.node_id)
        self._started_at = clock.seconds()
        self._box = SecretBox(identity.aes_key) if identity.aes_key is not None else None
        #: the facts of the last state the agent applied (drift and key changes are relative to it)
        self._applied = EMPTY_FACTS
        #: drift reports sent (for tests and the status)
        self.drift_reports = 0
        #: calls nobody waits for (drift reports): cancelled on close
        self._detached: set[defer.Deferred[Any]] = set()

    def __repr__(self) -> str:
        return f"<PlexdSession {self.node_id!r}>"

    def _request(self, call: Call, method: str, path: str, body: bytes | None = None) -> defer.Deferred[Reply]:
        return self.transport.request(call, method, self._prefix + path, self.identity.bearer, body)

    # -- state -----------------------------------------------------------

    def fetch_state(self) -> defer.Deferred[FetchedState]:
        d = self._request(Call.STATE, "GET", "/state")
        return d.addCallback(lambda reply: self._parse_state(_checked(Call.STATE, reply)))

    def _parse_state(self, reply: Reply) -> FetchedState:
        doc = json_object(Call.STATE, reply)
        try:
            state = NodeState(parse_metadata(doc.get("metadata")), parse_data_entries(doc.get("data")),
                              parse_secret_refs(doc.get("secret_refs")))
        except InvalidState as e:
            raise ControlPlaneError(Call.STATE, ErrorKind.TRANSIENT, f"state: unusable state document ({e})",
                                    status=reply.status) from None
        key_strings, keys = self._signing_keys(reply.body)
        facts = _Facts(key_strings, dict(state.metadata), {k: e["version"] for k, e in state.data.items()},
                       dict(state.secret_refs))
        if key_strings is None or key_strings == self._applied.keys:
            keys = None  # absent, or as before: the keys in force stay
        return FetchedState(state, keys, facts)

    def _signing_keys(self, body: bytes) -> tuple[tuple[str, str] | None, KeySet | None]:
        """``signing_keys`` read as Go reads it into plexd's ``*SigningKeys`` (None when absent or null)."""
        try:
            raw = gojson.decode_struct(body, {"signing_keys": gojson.RAW})["signing_keys"]
        except ValueError:
            raw = None
        if raw is None or raw == b"null":
            return None, None
        try:
            fields = gojson.decode_struct(raw, SIGNING_KEYS)
        except ValueError:
            log.warn("ignoring the state's signing_keys: not a key set with an RFC 3339 transition_expires; "
                     "the keys in force stay")
            return None, None
        strings = (fields["current"], fields["previous"])
        return strings, KeySet.from_strings(fields["current"], fields["previous"], fields["transition_expires"])

    def state_applied(self, fetched: FetchedState) -> None:
        """The cache took ``fetched``: report the drift plexd would report (one attempt, never retried)."""
        facts = fetched.facts if isinstance(fetched.facts, _Facts) else EMPTY_FACTS
        before, self._applied = self._applied, facts
        corrections = []
        if facts.keys != before.keys:
            corrections.append({"type": "signing_keys_updated", "detail": "signing keys rotated"})
        if facts.metadata != before.metadata:
            corrections.append({"type": "metadata_updated", "detail": "metadata updated"})
        if facts.data != before.data:
            corrections.append({"type": "data_updated", "detail": "data updated"})
        if facts.secret_refs != before.secret_refs:
            corrections.append({"type": "secret_refs_updated", "detail": "secret refs updated"})
        if not corrections:
            return
        self.drift_reports += 1
        body = encode_body({"timestamp": self._now(), "corrections": corrections})
        d = self._request(Call.DRIFT, "POST", "/drift", body)
        self._detached.add(d)
        d.addCallback(lambda reply: log.debug("drift report answered {status}", status=reply.status))
        d.addErrback(lambda f: log.debug("drift report failed: {error}", error=f.getErrorMessage()))
        d.addBoth(lambda _: self._detached.discard(d))

    def _now(self) -> str:
        return gojson.GoTime.from_unix_ns(round(self.clock.seconds() * 1e9)).marshal().decode("ascii")

    # -- secrets ---------------------------------------------------------

    def fetch_secret(self, query: SecretQuery) -> defer.Deferred[SecretValue]:
        d = self._request(Call.SECRET, "GET", "/secrets/" + path_escape(query.key))
        return d.addCallback(lambda reply: self._decrypt(query, _checked(Call.SECRET, reply)))

    def _decrypt(self, query: SecretQuery, reply: Reply) -> SecretValue:
        doc = json_object(Call.SECRET, reply)
        if self._box is None:
            raise DecryptionFailed()
        plaintext = self._box.decrypt(doc.get("ciphertext"), doc.get("nonce"))
        version = doc.get("version")
        return SecretValue(query.key, plaintext,
                           version if isinstance(version, int) and not isinstance(version, bool) else None)

    # -- heartbeat -------------------------------------------------------

    def heartbeat(self) -> defer.Deferred[HeartbeatAnswer]:
        async def beat() -> HeartbeatAnswer:
            checksum = await self._checksum()
            now = self.clock.seconds()
            # Exactly these five members, in Go's order.
            body = encode_body({"node_id": self.node_id, "timestamp": self._now(), "status": "ok",
                                "uptime": gojson.go_duration(int(now - self._started_at)),
                                "binary_checksum": checksum})
            reply = _checked(Call.HEARTBEAT, await self._request(Call.HEARTBEAT, "POST", "/heartbeat", body))
            answer = json_object(Call.HEARTBEAT, reply)
            # Either flag makes plexd fetch state at once (it never rotates its own key).
            if answer.get("reconcile") is True or answer.get("rotate_keys") is True:
                return HeartbeatAnswer((PullState(),))
            return HeartbeatAnswer()

        return defer.ensureDeferred(beat())

    # -- reports ---------------------------------------------------------

    def _post_report(self, entries: list[Mapping[str, Any]], deleted: list[str]) -> defer.Deferred[None]:
        # An empty list goes as null, as plexd sends it.
        body = encode_body({"entries": list(entries) or None, "deleted": list(deleted) or None})
        d = self._request(Call.REPORT, "POST", "/report", body)
        return d.addCallback(lambda reply: _succeeded(Call.REPORT, reply))

    def deliver_reports(self, changes: Changes, set_aside: SetAside) -> defer.Deferred[None]:
        return deliver_batch(self._post_report, changes, set_aside)

    # -- events ----------------------------------------------------------

    def open_events(self, last_event_id: str) -> defer.Deferred[Any]:
        headers = {b"Last-Event-ID": [last_event_id.encode("utf-8")]} if last_event_id else None
        d = self.transport.open_stream(Call.EVENTS, self._prefix + "/events", self.identity.bearer, headers)

        def answered(response: Any) -> Any:
            if response.code == 200:
                return response
            discard_body(response)
            raise classify(Call.EVENTS, Reply(response.code, response.headers, b""))

        return d.addCallback(answered)

    def rotate_node_key(self) -> defer.Deferred[Identity | None]:
        return defer.fail(NotImplementedError("plexd's protocol has no node key rotation"))

    def close(self) -> defer.Deferred[None]:
        """Abandon the calls nobody waits for: their connections must not outlive the transport."""
        for d in list(self._detached):
            d.cancel()
        return defer.succeed(None)


class PlexdEnroller:
    """``POST /v1/register`` with a bootstrap token, and ``POST .../deregister``."""

    def __init__(self, transport: Transport, hostname: str, clock: IReactorTime) -> None:
        self.transport = transport
        self.hostname = hostname
        self.clock = clock

    def enroll(self, token: str, keypair: NodeKeyPair) -> defer.Deferred[Identity]:
        body = encode_body({"token": token, "public_key": keypair.public_b64, "hostname": self.hostname})
        d = self.transport.request(Call.REGISTER, "POST", "/v1/register", token, body)
        return d.addCallback(lambda reply: self._identity(_checked(Call.REGISTER, reply), keypair))

    def _identity(self, reply: Reply, keypair: NodeKeyPair) -> Identity:
        doc = json_object(Call.REGISTER, reply)

        def unusable(field: str) -> ControlPlaneError:
            return ControlPlaneError(Call.REGISTER, ErrorKind.PERMANENT,
                                     f"register: unusable registration answer: {field}", status=reply.status)

        node_id, nsk = doc.get("node_id"), doc.get("node_secret_key")
        if not isinstance(node_id, str) or not node_id:
            raise unusable("node_id")
        # The NSK becomes a header: printable ASCII only.
        if not isinstance(nsk, str) or not _header_safe(nsk):
            raise unusable("node_secret_key")
        mesh_ip, signing_key = doc.get("mesh_ip", ""), doc.get("signing_public_key", "")
        if not isinstance(mesh_ip, str):
            raise unusable("mesh_ip")
        if not isinstance(signing_key, str):
            raise unusable("signing_public_key")
        enrolled_at = gojson.GoTime.from_unix_ns(round(self.clock.seconds() * 1e9)).marshal().decode("ascii")
        return Identity(NAME, node_id, bearer=nsk, aes_key=aes_key_from_nsk(nsk), nsk_text=nsk, mesh_ip=mesh_ip,
                        signing_public_key=signing_key, keypair=keypair, source="enrolled", enrolled_at=enrolled_at)

    def deregister(self, identity: Identity) -> defer.Deferred[None]:
        path = "/v1/nodes/" + path_escape(identity.node_id) + "/deregister"
        d = self.transport.request(Call.DEREGISTER, "POST", path, identity.bearer)
        return d.addCallback(lambda reply: _succeeded(Call.DEREGISTER, reply))


class PlexdLocalRules:
    """plexd carries any report the store takes; a secret is read only if the index names it."""

    def check_report_key(self, key: str) -> None:
        pass

    def check_report_put(self, key: str, payload: Any) -> None:
        pass

    def report_key_syncable(self, key: str) -> bool:
        return True

    def secret_query(self, key: str, version: bytes | None, index: Mapping[str, int]) -> SecretQuery:
        # The cached index is the gate: an unknown key costs no control-plane call.
        if key not in index:
            raise errors.NotFound("not found")
        return SecretQuery(key)

    def secret_error(self, error: ControlPlaneError) -> errors.PlexError:
        if error.kind is ErrorKind.NOT_FOUND:
            return errors.NotFound("not found")
        return errors.Unavailable("control plane unavailable")

    def secret_document(self, value: SecretValue, index: Mapping[str, int]) -> dict[str, Any]:
        version = value.version if value.version is not None else index.get(value.key)
        try:
            return {"key": value.key, "value": value.plaintext.decode("utf-8"), "version": version}
        except UnicodeDecodeError:
            # Binary secrets cannot be a JSON string: say how they are encoded.
            return {"key": value.key, "value": base64.b64encode(value.plaintext).decode("ascii"),
                    "encoding": "base64", "version": version}


#: The rules of a standalone agent (no control plane: nothing to restrict).
PERMISSIVE_RULES = PlexdLocalRules()


class PlexdProtocol:
    """plexd's protocol, built once per agent."""

    name = NAME
    auth_failure_policy = AuthFailurePolicy.KEEP_IDENTITY
    #: the first connection follows the first fetch; every reconnect pulls (events may have been missed)
    pull_on_every_connect = False

    def __init__(self, config: Any, transport: Transport, clock: IReactorTime) -> None:
        import socket

        self.transport = transport
        self.clock = clock
        self.hostname = socket.gethostname()
        self.event_codec = PlexdEventCodec()
        self.local_rules = PlexdLocalRules()
        self.checksum = BuildChecksum()

    def enroller(self) -> PlexdEnroller:
        return PlexdEnroller(self.transport, self.hostname, self.clock)

    def session(self, identity: Identity) -> PlexdSession:
        return PlexdSession(self.transport, identity, self.clock, self.checksum.hex)

    def identity_document(self, identity: Identity) -> dict[str, Any]:
        doc = {"format": 1, "protocol": NAME, "node_id": identity.node_id, "mesh_ip": identity.mesh_ip,
               "signing_public_key": identity.signing_public_key, "node_secret_key": identity.nsk_text}
        if identity.keypair is not None:
            doc.update(identity.keypair.document())
        doc["enrolled_at"] = identity.enrolled_at
        return doc

    def identity_from_document(self, doc: Mapping[str, Any]) -> Identity:
        """The identity ``identity_document`` wrote; ValueError naming what makes it unusable."""
        node_id, nsk = doc.get("node_id"), doc.get("node_secret_key")
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id: must be a non-empty string")
        if not isinstance(nsk, str) or not _header_safe(nsk):
            raise ValueError("node_secret_key: must be a non-empty string of printable ASCII")
        texts = {name: doc.get(name, "") for name in ("mesh_ip", "signing_public_key", "enrolled_at")}
        for name, value in texts.items():
            if not isinstance(value, str):
                raise ValueError(f"{name}: must be a string")
        keypair = NodeKeyPair.from_document(doc)
        return Identity(NAME, node_id, bearer=nsk, aes_key=aes_key_from_nsk(nsk), nsk_text=nsk,
                        mesh_ip=texts["mesh_ip"], signing_public_key=texts["signing_public_key"], keypair=keypair,
                        source="enrolled", enrolled_at=texts["enrolled_at"])

    def configured_identity(self, config: Any, bearer: str, nsk_text: str) -> Identity:
        from plexagent.node.secrets import parse_node_secret_key

        return Identity(NAME, config.node.id, bearer=bearer, aes_key=parse_node_secret_key(nsk_text),
                        nsk_text=nsk_text, signing_public_key=config.control_plane.signing_public_key,
                        source="configured")
