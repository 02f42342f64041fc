"""
The agent's link to its control plane: one identity, one session, and the
services that use it (state sync with its event stream, the heartbeat, the
report outbox), over the protocol ``service.py`` built.

The identity is pre-provisioned (``control_plane.token_file``), stored
(``identity.json``, from an earlier enrollment) or enrolled now
(``enrollment.Enrollment``); the services start once it is known. Until
then, and whatever the control plane does later, the Local Node API serves
its cache.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from plexagent.controlplane.events import EventStream
from plexagent.controlplane.keys import KeyRing
from plexagent.controlplane.outbox import ReportOutbox
from plexagent.controlplane.protocol import AuthFailurePolicy, Call, Identity
from plexagent.controlplane.sync import Heartbeat, StateSync
from plexagent.node.reports import ReportStore
from plexagent.node.state import StateCache

log = Logger()

#: At most one warning per call this often when credentials are refused.
AUTH_WARNING_EVERY = 60.0


class ControlPlaneLink(service.MultiService):
    """The identity, session and sync services of an agent with a control plane."""

    def __init__(self, config: Any, protocol: Any, transport: Any, cache: StateCache, reports: ReportStore,
                 clock: IReactorTime, configured: Identity | None = None,
                 run_in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread) -> None:
        super().__init__()
        self.setName("control-plane")
        self.config = config
        self.cp = config.control_plane
        self.protocol = protocol
        self.transport = transport
        self.cache = cache
        self.reports = reports
        self.clock = clock
        self.configured = configured
        self.run_in_thread = run_in_thread
        self.ring = KeyRing(config.node.data_dir, run_in_thread)
        self.identity: Identity | None = None
        self.session: Any = None
        self.sync: StateSync | None = None
        self.heartbeat: Heartbeat | None = None
        self.outbox: ReportOutbox | None = None
        #: refused credentials, by call
        self.auth_failures: collections.Counter[str] = collections.Counter()
        self._auth_warned: dict[str, float] = {}
        #: where the identity came from: configured, enrolled (stored or just made)
        self.identity_state = "configured" if configured is not None else "enrolling"

    @property
    def stream(self) -> EventStream | None:
        return self.sync.stream if self.sync is not None else None

    def startService(self) -> None:
        super().startService()
        if self.configured is not None:
            self.ready(self.configured, ("config", self.cp.signing_public_key))

    def ready(self, identity: Identity, *first_keys: tuple[str, str]) -> None:
        """Start the session and its services for ``identity``; the ring starts from ``first_keys``."""
        self.identity = identity
        self.session = session = self.protocol.session(identity)
        self.ring.seed(*first_keys)
        log.info("control plane {url}: protocol {protocol}, node {node_id} ({source})", url=self.transport.base_url,
                 protocol=self.protocol.name, node_id=identity.node_id, source=identity.source)
        self.sync = StateSync(session, self.cache, self.ring, self.clock, reconcile_interval=self.cp.reconcile_interval,
                              on_auth_failure=self.auth_failed, rotate_node_key=self.rotate_node_key)
        self.sync.setName("state-sync")
        if self.cp.events:
            self.sync.stream = EventStream(session, self.protocol.event_codec, self.ring, self.clock, run=self.sync.run,
                                           on_reconnect=self.sync.fetch_now, on_auth_failure=self.auth_failed,
                                           idle_timeout=self.cp.events_idle_timeout)
        self.heartbeat = Heartbeat(session, self.clock, self.cp.heartbeat_interval, run=self.sync.run,
                                   on_auth_failure=self.auth_failed)
        self.heartbeat.setName("heartbeat")
        self.outbox = ReportOutbox(self.reports, session.deliver_reports, self.clock, self.config.node.data_dir,
                                   self.cp.report_debounce, run_in_thread=self.run_in_thread,
                                   on_auth_failure=self.auth_failed)
        self.outbox.setName("report-outbox")
        for child in (self.sync, self.heartbeat, self.outbox):
            child.setServiceParent(self)  # started now if the link runs

    def auth_failed(self, call: Call) -> None:
        """The control plane refused the node's credentials on ``call``."""
        self.auth_failures[call.value] += 1
        now = self.clock.seconds()
        if now - self._auth_warned.get(call.value, -AUTH_WARNING_EVERY) >= AUTH_WARNING_EVERY:
            self._auth_warned[call.value] = now
            log.warn("the control plane refused this node's credentials ({call}); keeping the identity and "
                     "trying again", call=call.value)
        if self.protocol.auth_failure_policy is AuthFailurePolicy.REENROLL_WITH_TOKEN:
            self.reenroll_if_token()

    def reenroll_if_token(self) -> None:
        """Enroll again if a bootstrap token is at hand (protocols whose policy asks for it)."""

    def rotate_node_key(self) -> None:
        """Rotate the node's own key pair (protocols that ask for it)."""
        if self.session is not None:
            self.session.rotate_node_key().addErrback(
                lambda f: log.warn("node key rotation failed: {error}", error=f.getErrorMessage()))

    def stopService(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await defer.maybeDeferred(super().stopService)
        await self.ring.idle()
        if self.session is not None:
            await self.session.close()
        # Last: the connections close after everything using them has stopped.
        await self.transport.close()
