"""
Enrollment: turning a bootstrap token into the node's identity, once.

The token comes from ``PLEXD_BOOTSTRAP_TOKEN`` or, without it, from
``control_plane.bootstrap_token_file``; it is read only while the node has
no identity, never logged, never stored, and the file is deleted once the
enrolled identity is on disk. Enrollment never gives up while the agent
runs (it keeps serving its cache): transient failures are retried with
backoff (never sooner than a Retry-After), a refusal waits for a different
token, and no token means waiting for one.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from plexagent.controlplane.backoff import Backoff, cancel_call
from plexagent.controlplane.identity import NodeKeyPair
from plexagent.controlplane.keys import SigningKey
from plexagent.controlplane.protocol import Call, ControlPlaneError, ErrorKind, Identity
from plexagent.fileio import read_stored

log = Logger()

ENV_NAME = "PLEXD_BOOTSTRAP_TOKEN"
#: The longest token accepted (plexd's limit).
MAX_TOKEN_BYTES = 512
#: How often the token source is read again while there is no token...
WAIT_FOR_TOKEN = 15.0
#: ... and after a refusal, looking for a different one.
WAIT_AFTER_REFUSAL = 60.0


class TokenError(Exception):
    """The token source cannot be used; the message names it, never the token."""


@attrs.frozen
class Token:
    value: str = attrs.field(repr=False)
    #: the environment variable's name, or the file's path
    source: str
    from_file: bool


class BootstrapToken:
    """Where the bootstrap token comes from: the environment first, then the file."""

    def __init__(self, env_value: str, path: str) -> None:
        self._env = env_value
        self.path = path

    def read(self) -> Token | None:
        """The token, None when there is none, TokenError when its source is unusable."""
        if self._env:
            return self._check(Token(self._env, ENV_NAME, False))
        if not self.path:
            return None
        try:
            # Never blocks: a FIFO or device there is refused, not read.
            raw = read_stored(self.path, 64 * 1024, follow_symlinks=True)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TokenError(f"control_plane.bootstrap_token_file: cannot read {self.path}: {e.strerror}") from None
        except ValueError as e:
            raise TokenError(f"control_plane.bootstrap_token_file: cannot read {self.path}: {e}") from None
        text = raw.decode("utf-8", "replace").strip()
        return self._check(Token(text, self.path, True)) if text else None

    def _check(self, token: Token) -> Token:
        if len(token.value.encode("utf-8")) > MAX_TOKEN_BYTES:
            raise TokenError(f"the bootstrap token in {token.source} is longer than {MAX_TOKEN_BYTES} bytes")
        if not all(0x20 <= ord(c) <= 0x7E for c in token.value):
            raise TokenError(f"the bootstrap token in {token.source} holds characters other than printable ASCII")
        return token

    def delete(self, token: Token) -> None:
        """Remove the token file the token came from (a failure is only a warning)."""
        if not token.from_file:
            return
        try:
            os.unlink(token.source)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warn("could not delete the used bootstrap token file {path}: {error}", path=token.source,
                     error=e.strerror)


class Enrollment:
    """
    Attempts to enroll until it succeeds; ``on_enrolled`` receives the
    identity (and the token, to delete its file once the identity is
    durable). ``state`` is ``waiting_for_token``, ``enrolling``, ``failed``
    (``error`` says why) or ``enrolled``.
    """

    def __init__(self, enroller: Any, token_source: BootstrapToken, clock: IReactorTime,
                 on_enrolled: Callable[[Identity, Token], None], pin: str = "", node_id: str = "",
                 backoff: Backoff | None = None) -> None:
        self.enroller = enroller
        self.token_source = token_source
        self.clock = clock
        self._on_enrolled = on_enrolled
        self.pin = SigningKey.parse(pin) if pin else None
        self.node_id = node_id
        self.backoff = backoff or Backoff()
        #: one key pair per process: every retry sends the same public key
        self.keypair = NodeKeyPair.generate()
        self.state = "waiting_for_token"
        self.error: str | None = None
        #: attempts by outcome: ok, transient, rate_limited, refused
        self.attempts: collections.Counter[str] = collections.Counter()
        self._refused_token: str | None = None
        self._call: Any = None
        self._inflight: defer.Deferred[Any] | None = None
        self._running = False
        self._told_waiting = False

    def start(self) -> None:
        self._running = True
        self._try()

    def stop(self) -> None:
        self._running = False
        cancel_call(self._call)
        if self._inflight is not None:
            self._inflight.cancel()

    def _later(self, delay: float) -> None:
        if self._running:
            cancel_call(self._call)
            self._call = self.clock.callLater(delay, self._try)

    def _fail(self, message: str) -> None:
        if self.error != message:
            log.error("enrollment failed: {error}", error=message)
        self.state, self.error = "failed", message

    def _try(self) -> None:
        self._call = None
        if not self._running:
            return
        try:
            token = self.token_source.read()
        except TokenError as e:
            self._fail(str(e))
            self._later(WAIT_AFTER_REFUSAL)
            return
        if token is None:
            if not self._told_waiting:
                self._told_waiting = True
                hint = (" (node.id is set: a pre-provisioned node also needs control_plane.token_file and "
                        "node.secret_key_file)" if self.node_id else "")
                log.warn("waiting for a bootstrap token in {path} or {env} to enroll; serving the cached state"
                         "{hint}", path=self.token_source.path, env=ENV_NAME, hint=hint)
            self.state, self.error = "waiting_for_token", None
            self._later(WAIT_FOR_TOKEN)
            return
        if token.value == self._refused_token:
            self._later(WAIT_AFTER_REFUSAL)  # the control plane refused this one: wait for another
            return
        self.state, self.error = "enrolling", None
        log.info("enrolling with the bootstrap token from {source}", source=token.source)
        d = self.enroller.enroll(token.value, self.keypair)
        self._inflight = d
        d.addCallbacks(self._answered, self._attempt_failed, callbackArgs=(token,), errbackArgs=(token,))

    def _answered(self, identity: Identity, token: Token) -> None:
        self._inflight = None
        try:
            self._check(identity)
        except ControlPlaneError as e:
            self._refused(e, token)
            return
        self.attempts["ok"] += 1
        self.state, self.error = "enrolled", None
        log.info("enrolled as node {node_id}", node_id=identity.node_id)
        self._on_enrolled(identity, token)

    def _check(self, identity: Identity) -> None:
        def refuse(message: str) -> ControlPlaneError:
            return ControlPlaneError(Call.REGISTER, ErrorKind.PERMANENT, f"register: {message}")

        if self.node_id and identity.node_id != self.node_id:
            raise refuse(f"the control plane enrolled node {identity.node_id!r}, but node.id is {self.node_id!r}")
        key = SigningKey.parse(identity.signing_public_key) if identity.signing_public_key else None
        if self.pin is not None and (key is None or key.raw != self.pin.raw):
            raise refuse("the control plane's signing key does not match control_plane.signing_public_key")
        if key is None:
            log.warn("the registration's signing key is not base64 of a 32-byte Ed25519 key: events are "
                     "dropped until the first state fetch names the keys")
        if identity.aes_key is None:
            log.warn("the node secret key the control plane issued gives no AES-256 key: secret reads will "
                     "answer 500 decryption failed")

    def _attempt_failed(self, failure: Any, token: Token) -> None:
        self._inflight = None
        if failure.check(defer.CancelledError) or not self._running:
            return
        if not failure.check(ControlPlaneError):
            log.failure("enrollment attempt failed", failure)
            self.attempts["transient"] += 1
            self._later(self.backoff.next_delay())
            return
        error = failure.value
        if error.kind is ErrorKind.PERMANENT:
            self._refused(error, token)
            return
        self.attempts["rate_limited" if error.kind is ErrorKind.RATE_LIMITED else "transient"] += 1
        log.warn("enrollment attempt failed, retrying: {error}", error=str(error))
        self._later(self.backoff.next_delay(error.retry_after))

    def _refused(self, error: ControlPlaneError, token: Token) -> None:
        self.attempts["refused"] += 1
        self._refused_token = token.value
        self._fail(f"{error} (the token from {token.source} is not tried again; put a new one there)")
        self._later(WAIT_AFTER_REFUSAL)
