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
import os
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from plexagent.controlplane.backoff import cancel_call
from plexagent.controlplane.enrollment import BootstrapToken, Enrollment, Token, TokenError
from plexagent.controlplane.events import EventStream
from plexagent.controlplane.identity import IdentityMismatch, IdentityStore
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

    #: seconds between attempts to save an enrolled identity the disk refused
    SAVE_RETRY = 10.0

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
        # From now on the report store keeps each delete until the control
        # plane has it, even before the node has an identity to send it with.
        reports.synced(0)
        self.identity: Identity | None = None
        self.session: Any = None
        self.sync: StateSync | None = None
        self.heartbeat: Heartbeat | None = None
        self.outbox: ReportOutbox | None = None
        #: refused credentials, by call
        self.auth_failures: collections.Counter[str] = collections.Counter()
        self._auth_warned: dict[str, float] = {}
        self.store = IdentityStore(config.node.data_dir, protocol, run_in_thread)
        self.token_source = BootstrapToken(config.bootstrap_token_env, self.cp.bootstrap_token_file)
        self.enrollment: Enrollment | None = None
        self._state = "configured" if configured is not None else "enrolling"
        self._error: str | None = None
        self._save_call: Any = None
        self._reenrolled = False
        self._rotating = False
        #: enrollments after the control plane refused the credential
        self.reenrollments = 0
        #: node key pairs rotated and kept
        self.node_key_rotations = 0

    @property
    def stream(self) -> EventStream | None:
        return self.sync.stream if self.sync is not None else None

    @property
    def identity_state(self) -> str:
        """configured, enrolled, waiting_for_token, enrolling or failed."""
        if self.identity is None and self.enrollment is not None:
            return self.enrollment.state
        return self._state

    @property
    def identity_error(self) -> str | None:
        if self.identity is None and self.enrollment is not None:
            return self.enrollment.error
        return self._error

    def startService(self) -> None:
        super().startService()
        self._drop_unsyncable_reports()
        if self.configured is not None:
            if os.path.exists(self.store.path):
                log.info("control_plane.token_file is set: {path} is not used", path=self.store.path)
            self.ready(self.configured, ("config", self.cp.signing_public_key, self.configured.signing_key_id))
            return
        try:
            stored = self.store.load()
        except IdentityMismatch as e:
            self._state, self._error = "failed", str(e)
            log.error("no control-plane identity: {error}", error=str(e))
            return
        if stored is not None:
            if self.config.node.id and stored.node_id != self.config.node.id:
                self._state = "failed"
                self._error = (f"{self.store.path} is node {stored.node_id!r}, but node.id is "
                               f"{self.config.node.id!r}: correct node.id or run `plexagent deregister`")
                log.error("no control-plane identity: {error}", error=self._error)
                return
            # A restart never enrolls again.
            self._state = "enrolled"
            self.ready(stored, ("registration", stored.signing_public_key, stored.signing_key_id))
            return
        self.enrollment = Enrollment(self.protocol.enroller(), self.token_source, self.clock, self._enrolled,
                                     pin=self.cp.signing_public_key, node_id=self.config.node.id)
        self.enrollment.start()

    def _drop_unsyncable_reports(self) -> None:
        """Reports kept from before that this protocol cannot carry are dropped, their deletes queued."""
        rules = self.protocol.local_rules
        for entry in self.reports.list():
            key = entry["key"]
            if not rules.report_key_syncable(key):
                log.warn("dropping report {key}: the {protocol} protocol cannot carry its key",
                         key=key[:128], protocol=self.protocol.name)
                self.reports.delete(key).addErrback(self._not_dropped, key)

    @staticmethod
    def _not_dropped(failure: Failure, key: str) -> None:
        log.error("could not drop report {key}: {error}", key=key[:128], error=failure.getErrorMessage())

    def _enrolled(self, identity: Identity, token: Token) -> None:
        """Keep the identity on disk before anything else, then drop the used token and start."""
        self._state = "enrolled"

        def start(_: Any) -> None:
            if self.running and self.identity is None:
                self.ready(identity, ("registration", identity.signing_public_key, identity.signing_key_id),
                           fresh=self._reenrolled)

        self._keep(identity, "the enrolled identity (running with it in memory meanwhile)",
                   lambda: self.token_source.delete(token)).addBoth(start)

    def ready(self, identity: Identity, *first_keys: tuple[str, ...], fresh: bool = False) -> None:
        """
        Start the session and its services for ``identity``; the ring starts
        from ``first_keys`` (``fresh``: even if other keys were persisted).
        """
        self.identity = identity
        self.session = session = self.protocol.session(identity)
        self.ring.seed(*first_keys, fresh=fresh)
        log.info("control plane {url}: protocol {protocol}, node {node_id} ({source})", url=self.transport.base_url,
                 protocol=self.protocol.name, node_id=identity.node_id, source=identity.source)
        self.sync = StateSync(session, self.cache, self.ring, self.clock, reconcile_interval=self.cp.reconcile_interval,
                              on_auth_failure=self.auth_failed, rotate_node_key=self.rotate_node_key)
        self.sync.setName("state-sync")
        if self.cp.events:
            self.sync.stream = EventStream(session, self.protocol.event_codec, self.ring, self.clock, run=self.sync.run,
                                           on_reconnect=self.sync.fetch_now, on_auth_failure=self.auth_failed,
                                           idle_timeout=self.cp.events_idle_timeout,
                                           pull_on_every_connect=self.protocol.pull_on_every_connect)
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
        # A refused heartbeat is what says the credential is gone (plexd re-registers on it).
        if (self.protocol.auth_failure_policy is AuthFailurePolicy.REENROLL_WITH_TOKEN
                and call is Call.HEARTBEAT):
            self.reenroll_if_token()

    def reenroll_if_token(self) -> None:
        """
        Enroll again if a bootstrap token is at hand: the services stop, a
        new identity is enrolled and kept, and they start again with it.
        Without a token the node keeps its identity and keeps trying.
        """
        if self.identity is None or self.configured is not None or not self.running:
            return
        try:
            token = self.token_source.read()
        except TokenError:
            token = None  # the enrollment would only fail: keep the identity
        if token is None:
            return
        log.warn("the control plane refused node {node_id}'s credential and a bootstrap token is at hand: "
                 "enrolling again", node_id=self.identity.node_id)
        self.reenrollments += 1
        old_session, self.identity, self.session = self.session, None, None
        children = [c for c in (self.sync, self.heartbeat, self.outbox) if c is not None]
        self.sync = self.heartbeat = self.outbox = None
        stopped = [defer.maybeDeferred(child.disownServiceParent) for child in children]

        def enroll(_: Any) -> None:
            if old_session is not None:
                old_session.close()
            if not self.running:
                return
            self._state, self._reenrolled = "enrolling", True
            self.enrollment = Enrollment(self.protocol.enroller(), self.token_source, self.clock, self._enrolled,
                                         pin=self.cp.signing_public_key, node_id=self.config.node.id)
            self.enrollment.start()

        defer.gatherResults(stopped).addBoth(enroll)

    def rotate_node_key(self) -> None:
        """Rotate the node's own key pair (protocols that ask for it): one rotation at a time."""
        if self.session is None or self._rotating:
            return
        self._rotating = True
        session = self.session

        def rotated(identity: Identity | None) -> Any:
            if identity is None or session is not self.session:
                return None
            self.identity = identity
            self.node_key_rotations += 1
            return self._keep(identity, "the rotated node key")

        def done(result: Any) -> None:
            self._rotating = False
            if isinstance(result, Failure):
                log.warn("node key rotation failed: {error}", error=result.getErrorMessage())

        session.rotate_node_key().addCallback(rotated).addBoth(done)

    def _keep(self, identity: Identity, what: str,
              then: Callable[[], None] = lambda: None) -> defer.Deferred[None]:
        """
        Save ``identity`` and then call ``then``, trying again every
        SAVE_RETRY seconds while the disk refuses. Fires after the first
        attempt, whatever its outcome.
        """
        self._save_call = None

        def saved(_: Any) -> None:
            then()

        def not_saved(failure: Any) -> None:
            log.error("could not save {what} to {path}: {error}; trying again in {seconds}s", what=what,
                      path=self.store.path, error=failure.getErrorMessage(), seconds=self.SAVE_RETRY)
            if self.running:
                self._save_call = self.clock.callLater(self.SAVE_RETRY, self._keep, identity, what, then)

        return self.store.save(identity).addCallbacks(saved, not_saved)

    def stopService(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.enrollment is not None:
            self.enrollment.stop()
        cancel_call(self._save_call)
        await defer.maybeDeferred(super().stopService)
        await self.ring.idle()
        if self.session is not None:
            await self.session.close()
        # Last: the connections close after everything using them has stopped.
        await self.transport.close()
