"""
The plexsphere platform's node API (docs/control-plane-plexsphere.md):
enrollment into a project with a ``psb_`` bootstrap token, then the node's
calls with the structured ``nsk_plexd_`` bearer, as plexd makes them today.

What differs from plexd's protocol, and lives here: problem+json errors
whose ``code`` says what happened, 501 for what the platform has not
provisioned, a state snapshot of key/value lists (the agent numbers data
versions itself), secrets as raw bytes with their version in a header,
report entries written one key at a time, and the node's own key rotation.
The rules the Local Node API follows under this protocol are in
``plexsphere_rules``.
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from typing import Any, Mapping

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from plexagent import __version__, errors, strictparse
from plexagent.config import UUID_PATTERN, ConfigError
from plexagent.controlplane import gojson
from plexagent.controlplane.build import BuildChecksum
from plexagent.controlplane.client import Reply, Transport, json_object, path_escape, read_limited
from plexagent.controlplane.identity import NodeKeyPair
from plexagent.controlplane.plexsphere_events import PlexsphereEventCodec
from plexagent.controlplane.plexsphere_rules import POSITIVE_INTEGER, PlexsphereLocalRules, compact_value
from plexagent.controlplane.protocol import (
    AuthFailurePolicy,
    Call,
    ControlPlaneError,
    ErrorKind,
    FetchedState,
    HeartbeatAnswer,
    Identity,
    PullState,
    RefusedChange,
    RotateNodeKey,
    SecretQuery,
    SecretValue,
    SetAside,
)
from plexagent.node.reports import Changes
from plexagent.node.secrets import DecryptionFailed, SecretBox
from plexagent.node.state import NodeState

log = Logger()

NAME = "plexsphere"

#: The content type data entries are served with (the platform's values are strings).
DATA_CONTENT_TYPE = "text/plain; charset=utf-8"
#: The largest secret answer: 1 MiB of ciphertext, its nonce and tag.
MAX_SECRET_BYTES = (1 << 20) + 28
#: How long report calls stop after a 501 (in memory: a restart ends it).
REPORTS_PAUSE = 300.0
#: How long the event stream is not asked for after a 501.
EVENTS_PAUSE = 600.0
#: A pause that lasts until the agent restarts.
UNTIL_RESTART = math.inf



@attrs.frozen
class Problem:
    """What a problem+json answer says (``code`` and ``detail`` may be empty)."""

    code: str = ""
    detail: str = ""


def read_problem(body: bytes) -> Problem:
    """The ``code`` and ``detail`` of an error answer; empty when it is not a problem document."""
    try:
        doc = strictparse.parse_json(body[:64 * 1024])
    except errors.InvalidInput:
        return Problem()
    if not isinstance(doc, dict):
        return Problem()
    code, detail = doc.get("code"), doc.get("detail")
    return Problem(code if isinstance(code, str) else "", detail if isinstance(detail, str) else "")


def _printable(text: str, limit: int = 200) -> str:
    """Text from the control plane made safe for one log line."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def classify(call: Call, reply: Reply) -> ControlPlaneError:
    """What a non-2xx answer to ``call`` means under plexsphere's rules."""
    status = reply.status
    problem = read_problem(reply.body)
    code = _printable(problem.code, 64)
    retry_after = reply.retry_after if status in (429, 503) else None
    message = f"{call.value}: control plane answered {status}" + (f" {code}" if code else "")
    if problem.detail:
        message += f": {_printable(problem.detail)}"
    kind, pause = ErrorKind.TRANSIENT, None
    if call is Call.REGISTER:
        if status in (400, 403, 404, 422):
            kind = ErrorKind.PERMANENT
        elif status == 429:
            kind = ErrorKind.RATE_LIMITED
    elif status == 401:
        kind = ErrorKind.AUTH
        if call is Call.EVENTS:
            pause = UNTIL_RESTART
    elif status == 429:
        kind = ErrorKind.RATE_LIMITED
    elif status == 501:
        kind = ErrorKind.NOT_PROVISIONED
        pause = {Call.REPORT: REPORTS_PAUSE, Call.EVENTS: EVENTS_PAUSE}.get(call)
    elif call is Call.SECRET and status == 404:
        kind = ErrorKind.NOT_FOUND
    elif call is Call.REPORT and status == 400 and problem.code == "invalid_report":
        kind = ErrorKind.REFUSED
    elif call is Call.EVENTS and status == 400:
        # The platform refused the Last-Event-ID: reconnect without it.
        kind = ErrorKind.REFUSED
    elif call is Call.EVENTS and status in (403, 404):
        kind, pause = ErrorKind.PERMANENT, UNTIL_RESTART
    elif call is Call.ROTATE_KEY and 400 <= status < 500:
        kind = ErrorKind.REFUSED
    return ControlPlaneError(call, kind, message, status=status, retry_after=retry_after, code=problem.code,
                             pause=pause, revoked=status == 401 and problem.code == "nsk_revoked")


def _checked(call: Call, reply: Reply) -> Reply:
    if not 200 <= reply.status < 300:
        raise classify(call, reply)
    return reply


def encode_body(value: Any) -> bytes:
    """A request body: compact JSON, UTF-8, never compressed."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def bearer_token(node_id: str, nsk: bytes) -> str:
    """``nsk_plexd_`` and unpadded base64url of the node's 16 UUID bytes and its 32 NSK bytes."""
    raw = uuid.UUID(node_id).bytes + nsk
    return "nsk_plexd_" + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def nsk_bytes(text: str) -> bytes:
    """The 32 bytes of an NSK as the platform issues it (standard base64); ValueError otherwise."""
    raw = gojson.std_b64decode(text)
    if len(raw) != 32:
        raise ValueError("the node secret key must be standard base64 of 32 bytes")
    return raw


def _go_now(clock: IReactorTime) -> str:
    return gojson.GoTime.from_unix_ns(int(clock.seconds()) * 1_000_000_000).marshal().decode("ascii")


def snapshot_state(doc: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """
    The metadata and data values of a NodeStateSnapshot's ``state``
    (``null``: none). ValueError naming what is unusable.
    """
    state = doc.get("state")
    if state is None:
        return {}, {}
    if not isinstance(state, dict):
        raise ValueError("state: must be an object or null")

    def bucket(name: str) -> dict[str, str]:
        entries = state.get(name)
        if entries is None:
            return {}
        if not isinstance(entries, list):
            raise ValueError(f"state.{name}: must be a list")
        out = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"state.{name}[{i}]: must be an object")
            key, value = entry.get("key"), entry.get("value")
            if not isinstance(key, str) or not key or not isinstance(value, str):
                raise ValueError(f"state.{name}[{i}]: key and value must be strings")
            out[key] = value
        return out

    return bucket("metadata"), bucket("data")


def versioned(values: Mapping[str, str], current: NodeState, seen_at: str) -> dict[str, dict[str, Any]]:
    """
    Data entries for ``values``: a key keeps its version while its value
    stays, counts one up when the value changes, starts at 1 when new.
    """
    out = {}
    for key, value in values.items():
        held = current.data.get(key)
        if held is not None and held.get("payload") == value and held.get("content_type") == DATA_CONTENT_TYPE:
            out[key] = dict(held)
            continue
        version = held["version"] + 1 if held is not None and isinstance(held.get("version"), int) else 1
        out[key] = {"key": key, "content_type": DATA_CONTENT_TYPE, "payload": value, "version": version,
                    "updated_at": seen_at}
    return out


def read_identity(doc: Mapping[str, Any], texts: tuple[str, ...], **given: Any) -> Identity:
    """
    The identity in a registration answer or in identity.json: ``node_id``
    (a UUID), ``nsk`` (standard base64 of 32 bytes) and the string members
    ``texts`` (absent: ""); ValueError naming the first that is unusable.
    """
    node_id, nsk = doc.get("node_id"), doc.get("nsk")
    if not isinstance(node_id, str) or not UUID_PATTERN.fullmatch(node_id):
        raise ValueError("node_id: must be a UUID")
    try:
        aes_key = nsk_bytes(nsk) if isinstance(nsk, str) else None
    except ValueError:
        aes_key = None
    if aes_key is None or not isinstance(nsk, str):
        raise ValueError("nsk: must be standard base64 of 32 bytes")
    members: dict[str, Any] = {}
    for name in texts:
        value = doc.get(name, "")
        if not isinstance(value, str):
            raise ValueError(f"{name}: must be a string")
        members[name] = value
    return Identity(NAME, node_id, bearer=bearer_token(node_id, aes_key), aes_key=aes_key, nsk_text=nsk,
                    source="enrolled", **members, **given)


class PlexsphereSession:
    """The calls of one node enrolled with a plexsphere platform."""

    def __init__(self, transport: Transport, identity: Identity, clock: IReactorTime,
                 checksum: BuildChecksum) -> None:
        self.transport = transport
        self.identity = identity
        self.node_id = identity.node_id
        self.clock = clock
        self._checksum = checksum
        self._prefix = "/v1/nodes/" + path_escape(identity.node_id)
        self._box = SecretBox(identity.aes_key) if identity.aes_key is not None else None
        #: 501 answers already logged, by call (logged once each)
        self._not_provisioned: set[Call] = set()

    def __repr__(self) -> str:
        return f"<PlexsphereSession {self.node_id!r}>"

    def _request(self, call: Call, method: str, path: str, body: bytes | None = None,
                 **options: Any) -> defer.Deferred[Reply]:
        return self.transport.request(call, method, path, self.identity.bearer, body, gzip_over=None, **options)

    # -- state -----------------------------------------------------------

    def fetch_state(self) -> defer.Deferred[FetchedState]:
        d = self._request(Call.STATE, "GET", self._prefix + "/state")
        return d.addCallback(lambda reply: self._parse_state(_checked(Call.STATE, reply)))

    def _parse_state(self, reply: Reply) -> FetchedState:
        doc = json_object(Call.STATE, reply)
        seen_at = _go_now(self.clock)
        try:
            metadata, values = snapshot_state(doc)
        except ValueError as e:
            raise ControlPlaneError(Call.STATE, ErrorKind.TRANSIENT, f"state: unusable state snapshot ({e})",
                                    status=reply.status) from None
        first = NodeState(metadata, versioned(values, NodeState(), seen_at), {})

        def rebase(current: NodeState) -> NodeState:
            return NodeState(metadata, versioned(values, current, seen_at), {})

        return FetchedState(first, None, None, rebase)

    def state_applied(self, fetched: FetchedState) -> None:
        pass

    # -- secrets ---------------------------------------------------------

    def fetch_secret(self, query: SecretQuery) -> defer.Deferred[SecretValue]:
        path = self._prefix + "/secrets/" + path_escape(query.key)
        if query.version is not None:
            path += f"?version={query.version}"
        d = self._request(Call.SECRET, "GET", path, headers={b"Accept": [b"application/octet-stream"]},
                          max_bytes=MAX_SECRET_BYTES)
        return d.addCallback(lambda reply: self._decrypt(query, _checked(Call.SECRET, reply)))

    def _decrypt(self, query: SecretQuery, reply: Reply) -> SecretValue:
        header = (reply.header(b"x-plexsphere-secret-version") or b"").strip()
        if not POSITIVE_INTEGER.fullmatch(header.decode("ascii", "replace")):
            raise ControlPlaneError(Call.SECRET, ErrorKind.TRANSIENT,
                                    "secret: the answer has no usable X-Plexsphere-Secret-Version",
                                    status=reply.status)
        kid = reply.header(b"x-plexsphere-secret-kid")
        if kid:
            log.debug("secret {key} version {version} wrapped with {kid}", key=query.key, version=int(header),
                      kid=_printable(kid.decode("ascii", "replace"), 64))
        if self._box is None:
            raise DecryptionFailed()
        return SecretValue(query.key, self._box.decrypt_raw(reply.body), int(header))

    # -- heartbeat -------------------------------------------------------

    def heartbeat(self) -> defer.Deferred[HeartbeatAnswer]:
        async def beat() -> HeartbeatAnswer:
            checksum = await self._checksum.base64()
            body = encode_body({"client_now": _go_now(self.clock), "binary_checksum": checksum,
                                "binary_version": f"plexagent/{__version__}", "nat_summary": {}})
            reply = await self._request(Call.HEARTBEAT, "POST", self._prefix + "/heartbeat", body)
            if reply.status == 501:
                if Call.HEARTBEAT not in self._not_provisioned:
                    self._not_provisioned.add(Call.HEARTBEAT)
                    log.info("the control plane has no heartbeats provisioned ({code}); beating on",
                             code=read_problem(reply.body).code or "501")
                return HeartbeatAnswer()
            answer = json_object(Call.HEARTBEAT, _checked(Call.HEARTBEAT, reply))
            effects: list[Any] = []
            if answer.get("reconcile") is True:
                effects.append(PullState())
            if answer.get("rotate_keys") is True:
                effects.append(RotateNodeKey())
            return HeartbeatAnswer(tuple(effects))

        return defer.ensureDeferred(beat())

    # -- reports ---------------------------------------------------------

    def deliver_reports(self, changes: Changes, set_aside: SetAside) -> defer.Deferred[None]:
        """One call per changed key, keys ascending: PUT its value or DELETE it."""
        entries = {entry["key"]: entry for entry in changes.entries}

        async def deliver() -> None:
            for key in sorted(set(entries) | set(changes.deleted)):
                path = self._prefix + "/state/reports/" + path_escape(key)
                entry = entries.get(key)
                if entry is None:
                    reply = await self._request(Call.REPORT, "DELETE", path)
                    if reply.status == 404 or 200 <= reply.status < 300:
                        continue  # gone either way
                    if reply.status == 400:
                        # A key the platform refuses to name (kept from before): nothing to delete there.
                        code = read_problem(reply.body).code
                        await set_aside(RefusedChange("delete", key, None, 400, code))
                        continue
                    raise classify(Call.REPORT, reply)
                body = encode_body({"value": compact_value(entry.get("payload"))})
                reply = await self._request(Call.REPORT, "PUT", path, body)
                if 200 <= reply.status < 300:
                    continue
                error = classify(Call.REPORT, reply)
                if error.kind is not ErrorKind.REFUSED:
                    raise error
                log.warn("the control plane refused report {key} ({error}): set aside, not sent again",
                         key=key, error=str(error))
                await set_aside(RefusedChange("put", key, entry, reply.status, error.code))

        return defer.ensureDeferred(deliver())

    # -- events ----------------------------------------------------------

    def open_events(self, last_event_id: str) -> defer.Deferred[Any]:
        headers = {b"Last-Event-ID": [last_event_id.encode("utf-8")]} if last_event_id else None
        d = self.transport.open_stream(Call.EVENTS, self._prefix + "/events", self.identity.bearer, headers)

        def answered(response: Any) -> Any:
            if response.code == 200:
                return response
            # The reason is in the problem's code: read a little of it.
            def refused(body: bytes) -> Any:
                raise classify(Call.EVENTS, Reply(response.code, response.headers, body))

            def unread(_: Any) -> Any:
                raise classify(Call.EVENTS, Reply(response.code, response.headers, b""))

            return read_limited(response, 64 * 1024).addCallbacks(refused, unread)

        return d.addCallback(answered)

    # -- the node's own key ------------------------------------------------

    def rotate_node_key(self) -> defer.Deferred[Identity | None]:
        """
        Send a fresh public key (``POST /v1/keys/rotate``); the identity
        holding the new key pair once the platform took it, None when it had
        nothing to rotate or does not rotate keys.
        """
        keypair = NodeKeyPair.generate()
        body = encode_body({"new_public_key": keypair.public_b64})

        def answered(reply: Reply) -> Identity | None:
            if 200 <= reply.status < 300:
                doc = json_object(Call.ROTATE_KEY, reply)
                log.info("node key rotated (rotation {rotation}, key {kid})",
                         rotation=_printable(str(doc.get("rotation_id", "")), 64),
                         kid=_printable(str(doc.get("kid", "")), 64))
                return attrs.evolve(self.identity, keypair=keypair)
            error = classify(Call.ROTATE_KEY, reply)
            if reply.status in (409, 422) or error.kind is ErrorKind.NOT_PROVISIONED:
                log.info("no node key rotation: {error}", error=str(error))
                return None
            raise error

        return self._request(Call.ROTATE_KEY, "POST", "/v1/keys/rotate", body).addCallback(answered)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class PlexsphereEnroller:
    """``POST /v1/register`` into a project, with a ``psb_`` bootstrap token."""

    def __init__(self, transport: Transport, cp: Any, clock: IReactorTime) -> None:
        self.transport = transport
        self.cp = cp
        self.clock = clock
        #: the nonce of each token's registration (retries resend it)
        self._nonces: dict[str, str] = {}

    def enroll(self, token: str, keypair: NodeKeyPair) -> defer.Deferred[Identity]:
        nonce = self._nonces.setdefault(token, str(uuid.uuid4()))
        doc = {"project_id": self.cp.project_id, "resource_handle": self.cp.resource_handle,
               "bootstrap_token": token, "nonce": nonce, "public_key": keypair.public_b64}
        if self.cp.requested_resource_id:
            doc["requested_resource_id"] = self.cp.requested_resource_id
        d = self.transport.request(Call.REGISTER, "POST", "/v1/register", "", encode_body(doc), gzip_over=None)
        return d.addCallback(lambda reply: self._identity(_checked(Call.REGISTER, reply), keypair))

    def _identity(self, reply: Reply, keypair: NodeKeyPair) -> Identity:
        doc = json_object(Call.REGISTER, reply)

        def unusable(field: str) -> ControlPlaneError:
            return ControlPlaneError(Call.REGISTER, ErrorKind.PERMANENT,
                                     f"register: unusable registration answer: {field}", status=reply.status)

        try:
            return read_identity(doc, ("mesh_ip", "signing_public_key", "signing_key_id"), keypair=keypair,
                                 enrolled_at=_go_now(self.clock))
        except ValueError as e:
            raise unusable(str(e)) from None

    def deregister(self, identity: Identity) -> defer.Deferred[None]:
        return defer.fail(ControlPlaneError(
            Call.DEREGISTER, ErrorKind.PERMANENT,
            "the plexsphere node API has no call for a node to leave: remove the node in the platform, then "
            "run `plexagent deregister --forget` to remove its identity here"))


class PlexsphereProtocol:
    """plexsphere's node API, built once per agent."""

    name = NAME
    auth_failure_policy = AuthFailurePolicy.REENROLL_WITH_TOKEN
    #: every connection, the first too, is followed by a state pull (plexd's reconnect loop)
    pull_on_every_connect = True

    def __init__(self, config: Any, transport: Transport, clock: IReactorTime) -> None:
        self.config = config
        self.transport = transport
        self.clock = clock
        self.checksum = BuildChecksum()
        self.event_codec = PlexsphereEventCodec()
        self.local_rules = PlexsphereLocalRules(clock)

    def enroller(self) -> PlexsphereEnroller:
        return PlexsphereEnroller(self.transport, self.config.control_plane, self.clock)

    def session(self, identity: Identity) -> PlexsphereSession:
        return PlexsphereSession(self.transport, identity, self.clock, self.checksum)

    def identity_document(self, identity: Identity) -> dict[str, Any]:
        doc = {"format": 1, "protocol": NAME, "node_id": identity.node_id, "nsk": identity.nsk_text,
               "mesh_ip": identity.mesh_ip, "signing_public_key": identity.signing_public_key,
               "signing_key_id": identity.signing_key_id}
        if identity.keypair is not None:
            doc.update(identity.keypair.document())
        doc["enrolled_at"] = identity.enrolled_at
        return doc

    def identity_from_document(self, doc: Mapping[str, Any]) -> Identity:
        keypair = NodeKeyPair.from_document(doc)
        return read_identity(doc, ("mesh_ip", "signing_public_key", "signing_key_id", "enrolled_at"),
                             keypair=keypair)

    def configured_identity(self, config: Any, bearer: str, nsk_text: str) -> Identity:
        """A pre-provisioned node: its UUID and NSK; the bearer is derived from them (``bearer`` is unused)."""
        node_id = config.node.id
        if not UUID_PATTERN.fullmatch(node_id or ""):
            raise ConfigError('node.id: must be the node\'s UUID with protocol "plexsphere"')
        try:
            aes_key = nsk_bytes(nsk_text.strip())
        except ValueError:
            raise ConfigError('node.secret_key_file: must hold standard base64 of 32 bytes with protocol '
                              '"plexsphere"') from None
        return Identity(NAME, node_id, bearer=bearer_token(node_id, aes_key), aes_key=aes_key,
                        nsk_text=nsk_text.strip(), signing_public_key=config.control_plane.signing_public_key,
                        source="configured")

