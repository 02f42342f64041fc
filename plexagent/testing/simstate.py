"""
What the control-plane simulator holds: the nodes' state and credentials,
and the faults tests inject (``plexagent.testing.simulator``).
"""

from __future__ import annotations

import secrets
from typing import Any

import attrs
from twisted.internet import defer

EXAMPLE_NODE_ID = "edge-us-west-42"


def new_nsk() -> str:
    """A node secret key as a plexd control plane issues it: 32 URL-safe characters."""
    return secrets.token_urlsafe(24)


@attrs.define
class Failure:
    status: int
    times: int
    retry_after: int | None = None
    #: the problem ``code`` (plexsphere; None: the usual code for the endpoint and status)
    code: str | None = None


class Hold:
    """Requests to one endpoint wait until ``release()``; ``arrived`` fires when the first comes in."""

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
    """
    What the simulator does wrong, set by tests. Endpoint names: register,
    state, secret, heartbeat, report, drift, events, deregister; under
    plexsphere also keys_rotate (and "report" covers PUT and DELETE).
    """

    #: seconds to wait before answering any request
    delay: float = 0.0
    #: per endpoint: answer ``status`` for the next ``times`` requests
    failures: dict[str, Failure] = attrs.field(factory=dict)
    #: flip a bit of every secret ciphertext
    tamper_secrets: bool = False
    #: per endpoint: seconds to wait before answering (beside ``delay``)
    delays: dict[str, float] = attrs.field(factory=dict)
    #: answer the next this-many heartbeats with ``reconcile: true`` / ``rotate_keys: true``
    heartbeat_reconcile: int = 0
    heartbeat_rotate_keys: int = 0
    #: the event stream sends nothing at all, not even keep-alives
    silent_stream: bool = False
    #: report keys whose batches are refused with the given status
    refused_report_keys: dict[str, int] = attrs.field(factory=dict)
    #: per endpoint: requests wait for the test to release them
    holds: dict[str, Hold] = attrs.field(factory=dict)
    #: every node's bearer is refused (401)
    bearer_revoked: bool = False
    #: members overriding the registration answer
    registration_answer: dict[str, Any] = attrs.field(factory=dict)
    #: gzip state answers (to clients that accept it); a bomb: over 10 MiB gunzipped
    gzip_responses: bool = False
    gzip_bomb: bool = False
    #: plexsphere: endpoints answering 501 (their ``*_not_provisioned`` code) until removed
    not_provisioned: set[str] = attrs.field(factory=set)
    #: plexsphere: per endpoint, cut the connection of the next this-many requests instead of answering
    cuts: dict[str, int] = attrs.field(factory=dict)
    #: plexsphere: the X-Plexsphere-Secret-Version header to send instead of the version
    secret_version_header: str | None = None

    def fail(self, endpoint: str, status: int = 503, times: int = 1, retry_after: int | None = None,
             code: str | None = None) -> None:
        self.failures[endpoint] = Failure(status, times, retry_after, code)

    def unprovision(self, *endpoints: str) -> None:
        """plexsphere: answer 501 ``<...>_not_provisioned`` on ``endpoints`` until ``not_provisioned`` drops them."""
        self.not_provisioned.update(endpoints)

    def cut(self, endpoint: str, times: int = 1) -> None:
        """plexsphere: drop the connection of the next ``times`` requests to ``endpoint`` unanswered."""
        self.cuts[endpoint] = times

    def take_cut(self, endpoint: str) -> bool:
        left = self.cuts.get(endpoint, 0)
        if left > 0:
            self.cuts[endpoint] = left - 1
            return True
        return False

    def take_failure(self, endpoint: str) -> Failure | None:
        failure = self.failures.get(endpoint)
        if failure is None or failure.times <= 0:
            return None
        failure.times -= 1
        return failure

    def take(self, counter: str) -> bool:
        """Use one of a one-shot counter (heartbeat_reconcile, heartbeat_rotate_keys)."""
        left = getattr(self, counter)
        if left > 0:
            setattr(self, counter, left - 1)
            return True
        return False

    def slow(self, endpoint: str, seconds: float) -> None:
        """Answer requests to ``endpoint`` only after ``seconds``."""
        self.delays[endpoint] = seconds

    def refuse_report_key(self, key: str, status: int = 400) -> None:
        """Refuse (``status``, applying nothing) every report batch holding ``key``."""
        self.refused_report_keys[key] = status

    def hold(self, endpoint: str) -> Hold:
        """Keep requests to ``endpoint`` waiting until the returned hold is released."""
        hold = self.holds[endpoint] = Hold()
        return hold

    def revoke_bearer(self) -> None:
        self.bearer_revoked = True

    def clear(self) -> None:
        for hold in self.holds.values():
            hold.release()
        fresh = Faults()
        for field in attrs.fields(Faults):
            setattr(self, field.name, getattr(fresh, field.name))


@attrs.define
class NodeRecord:
    """The state the control plane holds for its nodes."""

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


def example_record(protocol: str = "plexd") -> NodeRecord:
    """
    The example node of the Local Node API guide. Under plexsphere its
    secrets are named as that protocol's names go (``tls-server-key``,
    ``db-password``: no ``/``).
    """
    record = NodeRecord(
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
    if protocol == "plexsphere":
        record.secrets = {name.replace("/", "-").replace(".", "-"): value for name, value in record.secrets.items()}
    return record


@attrs.define
class NodeCredentials:
    """One node the control plane knows: its id and NSK."""

    node_id: str
    nsk_text: str = attrs.field(repr=False)
    mesh_ip: str = ""
    public_key: str = ""
    deregistered: bool = False
    #: event streams this node opened
    streams: int = 0
    #: plexsphere: a node key rotation was asked for (heartbeat or event) and not yet made
    rotation_pending: bool = False
    #: plexsphere: the version of the key wrapping the node's secrets (+1 per key rotation)
    wrap_key_version: int = 1
