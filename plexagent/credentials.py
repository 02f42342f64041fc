"""
Credentials re-read without a restart: the agent API's keys, the Local
Node API's bearer token, the agent API's TLS certificate, key and client
CA. ``service.py`` registers each with the ``CredentialReloader``: how to
read it (from its files, in a thread) and how to put it in use. A reload
(SIGHUP, ``POST /plexagent/reload`` on the socket, ``plexagent reload``)
reads them all; what cannot be read keeps the value in use and logs one
line naming the key and the path, never the content. Connections are not
dropped: listeners stay bound, and a new TLS certificate is used for the
connections accepted afterwards.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

import attrs
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger

from plexagent.config import ConfigError

log = Logger()


@attrs.frozen
class _Credential:
    key: str
    read: Callable[[], Any]
    apply: Callable[[Any], None]


class CredentialReloader:
    """
    Re-reads the registered credentials on ``reload()``, one reload at a
    time, each file read on a thread (never the reactor).
    """

    def __init__(self, reactor: Any, run_in_thread: Callable[..., defer.Deferred[Any]] | None = None) -> None:
        self.reactor = reactor
        self._credentials: list[_Credential] = []
        self._lock = defer.DeferredLock()
        self._waiting: list[defer.Deferred[dict[str, Any]]] = []
        self._run_in_thread = run_in_thread or (
            lambda fn: threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn)
        )

    @property
    def keys(self) -> list[str]:
        """The configuration keys a reload re-reads."""
        return [credential.key for credential in self._credentials]

    def add(self, key: str, read: Callable[[], Any], apply: Callable[[Any], None]) -> None:
        """Have ``reload`` call ``apply(read())`` (``read`` on a thread) for the credential named by ``key``."""
        self._credentials.append(_Credential(key, read, apply))

    def next_reload(self) -> defer.Deferred[dict[str, Any]]:
        """Fires with the outcome of the next reload to end (tests, SIGHUP)."""
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiting.append(d)
        return d

    def reload(self) -> defer.Deferred[dict[str, Any]]:
        """
        Re-read every credential; fires with ``{"reloaded": [key, ...],
        "failed": {key: why}}``. Never fails.
        """
        return self._lock.run(lambda: defer.ensureDeferred(self._reload()))

    async def _reload(self) -> dict[str, Any]:
        reloaded: list[str] = []
        failed: dict[str, str] = {}
        for credential in self._credentials:
            try:
                value = await self._run_in_thread(credential.read)
                credential.apply(value)
            except ConfigError as e:
                failed[credential.key] = str(e)
            except Exception as e:  # noqa: BLE001 - any failure keeps the credential in use
                # The class only: an exception's text might quote a file's content.
                failed[credential.key] = f"{credential.key}: cannot be loaded ({type(e).__name__})"
            else:
                reloaded.append(credential.key)
        for key, why in failed.items():
            log.warn("reload: {why}; keeping the {key} in use", why=why, key=key)
        log.info("reload: re-read {reloaded}", reloaded=", ".join(reloaded) or "nothing")
        outcome = {"reloaded": reloaded, "failed": failed}
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(outcome)
        return outcome


class HangupReload(service.Service):
    """
    SIGHUP reloads the credentials. A handler installed before (by a log
    set-up, say) is still called after ours; twistd's own log rotation is
    on SIGUSR1 and is left alone. Without this handler SIGHUP would end the
    process.
    """

    def __init__(self, reactor: Any, reloader: CredentialReloader) -> None:
        self.setName("sighup-reload")
        self.reactor = reactor
        self.reloader = reloader
        self._previous: Any = None
        self._installed = False

    def privilegedStartService(self) -> None:
        # twistd calls this on every service before it starts any: a SIGHUP
        # during startup must not end the agent.
        super().privilegedStartService()
        self._install()

    def startService(self) -> None:
        super().startService()
        self._install()

    def stopService(self) -> None:
        super().stopService()
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _install(self) -> None:
        if self._installed:
            return
        self._installed = True
        self._previous = signal.signal(signal.SIGHUP, self._received)

    def _received(self, signum: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of whatever the main
        # thread was doing: hand the work to the reactor.
        self.reactor.callFromThread(self._reload)
        previous = self._previous
        if callable(previous):
            previous(signum, frame)

    def _reload(self) -> None:
        log.info("received SIGHUP: reloading credentials")
        self.reloader.reload()
