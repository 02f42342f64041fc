"""
The seam between the agent and a control-plane wire protocol.

The agent speaks one protocol, chosen by ``control_plane.protocol`` and
built once (``build_protocol``): one ``ControlPlaneProtocol`` value hands out
what differs between protocols (enrollment, the calls of an enrolled node,
the event codec, what the socket may accept) and the rest of the agent
works on the value types defined here. Callers dispatch on the types of
what they get back (an ``Effect``, an ``ErrorKind``), never on the
protocol's name: the registry at the bottom is the only place that maps a
name to code.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import attrs
from twisted.internet.defer import Deferred

from plexagent import errors
from plexagent.controlplane import gojson
from plexagent.node.state import NodeState

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from plexagent.config import Config
    from plexagent.controlplane.client import Transport
    from plexagent.controlplane.identity import NodeKeyPair
    from plexagent.controlplane.keys import KeySet
    from plexagent.node.reports import Changes


class Call(enum.Enum):
    """The calls an agent makes; errors and metrics name them."""

    REGISTER = "register"
    STATE = "state"
    SECRET = "secret"
    HEARTBEAT = "heartbeat"
    REPORT = "report"
    DRIFT = "drift"
    EVENTS = "events"
    DEREGISTER = "deregister"
    ROTATE_KEY = "rotate_key"


class ErrorKind(enum.Enum):
    """What a failed call means for the agent; the protocol decides it from the answer."""

    #: credentials refused (401): counted; what follows is the protocol's auth-failure policy
    AUTH = "auth"
    #: 429: wait at least ``retry_after``
    RATE_LIMITED = "rate_limited"
    #: network, timeout, an answer that does not decode, 5xx, ...: back off and retry
    TRANSIENT = "transient"
    #: stop this activity (a registration the control plane refuses)
    PERMANENT = "permanent"
    #: the named thing does not exist (an unknown secret)
    NOT_FOUND = "not_found"
    #: the content sent was refused (a report batch): set aside, never retried
    REFUSED = "refused"
    #: the control plane does not offer this call yet: pause for ``pause`` seconds
    NOT_PROVISIONED = "not_provisioned"


class ControlPlaneError(Exception):
    """
    A control-plane call failed. The message names the call and what
    happened (a status, "timed out"), never a credential or a body.
    ``retry_after`` is a floor for the next attempt; ``code`` the control
    plane's own name for the failure, when it gives one; ``pause`` how long
    the activity stops (``math.inf``: until the agent restarts) instead of
    backing off; ``revoked`` says the node's credential was revoked (not
    merely refused).
    """

    def __init__(self, call: Call, kind: ErrorKind, message: str, status: int | None = None,
                 retry_after: float | None = None, code: str = "", pause: float | None = None,
                 revoked: bool = False) -> None:
        super().__init__(message)
        self.call = call
        self.kind = kind
        self.status = status
        self.retry_after = retry_after
        self.code = code
        self.pause = pause
        self.revoked = revoked


# -- what a control plane says ----------------------------------------------


@attrs.frozen
class Identity:
    """One enrolled (or pre-provisioned) node: who it is and how it authenticates."""

    protocol: str
    node_id: str
    #: the ``Authorization: Bearer`` credential
    bearer: str = attrs.field(repr=False)
    #: the AES-256-GCM key secrets are encrypted with; None when the NSK gives none
    aes_key: bytes | None = attrs.field(repr=False)
    #: the node secret key exactly as issued
    nsk_text: str = attrs.field(repr=False)
    mesh_ip: str = ""
    #: the signing key the registration answered (standard base64), as issued
    signing_public_key: str = ""
    signing_key_id: str = ""
    keypair: "NodeKeyPair | None" = attrs.field(default=None, repr=False)
    #: "enrolled" (identity.json) or "configured" (control_plane.token_file)
    source: str = "enrolled"
    enrolled_at: str = ""


@attrs.frozen
class FetchedState:
    """A state fetch: what the Local Node API serves, and the signing keys it names."""

    state: NodeState
    #: keys to install; None leaves the keys in force alone
    keys: "KeySet | None" = None
    #: protocol-private facts for ``NodeSession.state_applied``
    facts: Any = None
    #: for a protocol whose answer depends on what the agent already holds
    #: (versions it keeps itself): the state to serve, given the one served now
    rebase: "Callable[[NodeState], NodeState] | None" = attrs.field(default=None, eq=False)

    def state_over(self, current: NodeState) -> NodeState:
        """The state to serve in place of ``current``."""
        return self.state if self.rebase is None else self.rebase(current)


@attrs.frozen
class SecretQuery:
    key: str
    version: int | None = None


@attrs.frozen
class SecretValue:
    key: str
    plaintext: bytes = attrs.field(repr=False)
    version: int | None = None


@attrs.frozen
class Envelope:
    """An event as every codec sees it; each codec subclasses it with what it verifies."""

    event_type: str
    event_id: str
    issued_at_ns: int
    #: the payload's bytes as received; None when absent
    payload_raw: bytes | None = attrs.field(repr=False)


# -- effects: what an event or a heartbeat answer asks of the agent ----------


@attrs.frozen
class ReplaceState:
    """Replace parts of the cached state: keyword arguments of ``StateCache.update``."""

    changes: Mapping[str, Any]


@attrs.frozen
class PullState:
    """Fetch the whole state now."""


@attrs.frozen
class InstallSigningKeys:
    keys: "KeySet"


@attrs.frozen
class RotateNodeKey:
    """Rotate the node's own key pair (a protocol that asks for it)."""


@attrs.frozen
class Ignore:
    why: str


Effect = ReplaceState | PullState | InstallSigningKeys | RotateNodeKey | Ignore


@attrs.frozen
class HeartbeatAnswer:
    effects: tuple[Effect, ...] = ()


class DropReason(enum.Enum):
    """Why an event was not applied (a metrics label: values never change)."""

    INVALID_JSON = "invalid_json"
    MISSING_FIELD = "missing_field"
    BAD_ISSUED_AT = "bad_issued_at"
    STALE = "stale"
    FUTURE = "future"
    BAD_SIGNATURE = "bad_signature"
    REPLAY = "replay"
    NO_KEY = "no_key"
    UNKNOWN_KEY = "unknown_key"
    TOO_LARGE = "too_large"
    UNUSABLE_PAYLOAD = "unusable_payload"


class Dropped(Exception):
    """An event that must not be applied; ``detail`` names a field, never content."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(reason.value + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


def decode_envelope_fields(data: bytes, schema: Mapping[str, str]) -> dict[str, Any]:
    """
    An envelope's members, decoded as Go decodes them into its struct
    (``gojson.decode_struct``); Dropped when Go could not.
    """
    try:
        return gojson.decode_struct(data, schema)
    except gojson.GoTimeError:
        raise Dropped(DropReason.BAD_ISSUED_AT) from None
    except (gojson.GoSyntaxError, gojson.GoTypeError):
        raise Dropped(DropReason.INVALID_JSON) from None


#: How far an event's issued_at may be from the agent's clock, either way (exactly 5 minutes is still fresh).
FRESHNESS_NS = 300 * 1_000_000_000


def check_fresh(issued_ns: int, now_ns: int) -> None:
    """Dropped (STALE or FUTURE) unless ``issued_ns`` is within FRESHNESS_NS of ``now_ns``."""
    if now_ns - issued_ns > FRESHNESS_NS:
        raise Dropped(DropReason.STALE)
    if issued_ns > now_ns + FRESHNESS_NS:
        raise Dropped(DropReason.FUTURE)


class AuthFailurePolicy(enum.Enum):
    """What the agent does when the control plane refuses the node's credentials."""

    #: keep the identity, try again at the next call (plexd)
    KEEP_IDENTITY = "keep"
    #: enroll again if a bootstrap token is at hand
    REENROLL_WITH_TOKEN = "reenroll"


# -- the interfaces -----------------------------------------------------------

@attrs.frozen
class RefusedChange:
    """One report change the control plane refused for its content."""

    #: "put" or "delete"
    op: str
    key: str
    #: the entry written (a put), else None
    entry: Mapping[str, Any] | None
    status: int | None
    code: str = ""


#: Keeps a refused change (on disk, counted); fires once it is kept.
SetAside = Callable[[RefusedChange], Deferred[None]]


class Enroller(Protocol):
    def enroll(self, token: str, keypair: "NodeKeyPair") -> Deferred[Identity]:
        """One registration attempt; ControlPlaneError on failure."""

    def deregister(self, identity: Identity) -> Deferred[None]:
        """Tell the control plane the node leaves."""


class NodeSession(Protocol):
    """The calls of one enrolled node (its id and bearer bound in)."""

    @property
    def node_id(self) -> str: ...

    def fetch_state(self) -> Deferred[FetchedState]: ...

    def state_applied(self, fetched: FetchedState) -> None: ...

    def fetch_secret(self, query: SecretQuery) -> Deferred[SecretValue]: ...

    def heartbeat(self) -> Deferred[HeartbeatAnswer]: ...

    def deliver_reports(self, changes: "Changes", set_aside: SetAside) -> Deferred[None]: ...

    def open_events(self, last_event_id: str) -> Deferred[Any]: ...

    def rotate_node_key(self) -> Deferred[Identity | None]:
        """The identity with the node's new key pair (to keep), or None when nothing changed."""

    def close(self) -> Deferred[None]: ...


class EventCodec(Protocol):
    @property
    def max_event_bytes(self) -> int: ...

    def decode(self, data: bytes) -> Envelope:
        """The envelope in an event's data; Dropped if it cannot be one."""

    def verify(self, envelope: Envelope, keys: "KeySet", now_ns: int) -> None:
        """Dropped unless the envelope is genuine and fresh (records replay state)."""

    def effect(self, envelope: Envelope, keys: "KeySet | None" = None) -> Effect:
        """
        What a verified envelope asks for, given the keys in force;
        Dropped(UNUSABLE_PAYLOAD) if it cannot be used.
        """


class LocalRules(Protocol):
    """What the wire protocol can carry, enforced at the socket before anything is stored or sent."""

    def check_report_key(self, key: str) -> None: ...

    def check_report_put(self, key: str, payload: Any) -> None: ...

    def report_key_syncable(self, key: str) -> bool: ...

    def secret_query(self, key: str, version: bytes | None, index: Mapping[str, int]) -> SecretQuery: ...

    def secret_error(self, error: ControlPlaneError) -> errors.PlexError: ...

    def secret_document(self, value: SecretValue, index: Mapping[str, int]) -> dict[str, Any]:
        """The Local Node API's answer for a secret read."""


class ControlPlaneProtocol(Protocol):
    """One wire protocol, built once per agent (``build_protocol``)."""

    @property
    def name(self) -> str: ...

    @property
    def auth_failure_policy(self) -> AuthFailurePolicy: ...

    @property
    def event_codec(self) -> EventCodec: ...

    @property
    def local_rules(self) -> LocalRules: ...

    @property
    def pull_on_every_connect(self) -> bool:
        """Whether the state is pulled after every stream connection, the first too (else after reconnects)."""

    def enroller(self) -> Enroller: ...

    def session(self, identity: Identity) -> NodeSession: ...

    def identity_document(self, identity: Identity) -> dict[str, Any]: ...

    def identity_from_document(self, doc: Mapping[str, Any]) -> Identity: ...

    def configured_identity(self, config: "Config", bearer: str, nsk_text: str) -> Identity: ...


def build_protocol(config: "Config", transport: "Transport", clock: "IReactorTime") -> ControlPlaneProtocol:
    """The protocol ``control_plane.protocol`` names: the one place a name becomes code."""
    from plexagent.config import ConfigError

    name = config.control_plane.protocol
    factory = _registry().get(name)
    if factory is None:
        raise ConfigError(f'control_plane.protocol: "{name}" is not available in this version of plexagent')
    return factory(config, transport, clock)


def _registry() -> dict[str, Callable[..., ControlPlaneProtocol]]:
    from plexagent.controlplane.plexd import PlexdProtocol
    from plexagent.controlplane.plexsphere import PlexsphereProtocol

    return {"plexd": PlexdProtocol, "plexsphere": PlexsphereProtocol}
