"""The twistd command line: ``--config PATH``; errors stop startup in one line."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from plexagent.config import ConfigError, load_config


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Path of the TOML configuration file (default: built-in defaults)."],
    ]

    def opt_version(self) -> None:
        """Display plexagent's version (and the Twisted it runs on) and exit."""
        from plexagent import __version__
        from twisted import copyright

        print(f"plexagent {__version__} (Twisted {copyright.version})")
        sys.exit(0)


class TwistdRoot(service.MultiService):
    """
    What twistd runs: the agent's service tree and, when no ``--logger``
    was given, the text log observer twistd is to use (set on its
    Application, the documented way to choose one): twistd's own, with
    each failure on one line (``plexagent.logs.OneLineFailures``).
    """

    def __init__(self, top: service.Service, log_observer: Any = None) -> None:
        super().__init__()
        self.top = top
        top.setServiceParent(self)
        self.log_observer = log_observer

    def setServiceParent(self, parent: Any) -> None:
        if (self.log_observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver, None) is None):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)


def text_log_observer(twistd_options: Any) -> Any:
    """The observer twistd would make from its options (file, stdout, syslog), failures on one line."""
    from twisted.logger import LegacyLogObserverWrapper
    from twisted.scripts.twistd import _SomeApplicationRunner

    from plexagent.logs import OneLineFailures

    # The runner's own logger makes the observer, so --logfile, --syslog
    # and log rotation on SIGUSR1 behave exactly as twistd documents.
    observer = _SomeApplicationRunner.loggerFactory(twistd_options)._getLogObserver()
    if not ILogObserver.providedBy(observer):
        observer = LegacyLogObserverWrapper(observer)
    return OneLineFailures(observer)


def makeService(options: Options, reactor: Any = None, environ: Any = None) -> Any:
    from plexagent import service as agent_service

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        config = load_config(options["config"], os.environ if environ is None else environ)
        top = agent_service.makeService(config, reactor)
    except ConfigError as e:
        # One line naming the key or path; twistd exits non-zero.
        print(f"plexagent: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    agent_service.GracefulTermination(reactor).setServiceParent(top)
    from plexagent.credentials import HangupReload

    HangupReload(reactor, top.agent.reloader).setServiceParent(top)  # type: ignore[attr-defined]
    twistd_options = getattr(options, "parent", None)  # twistd's ServerOptions, when run by twistd
    if twistd_options is None or twistd_options.get("logger"):
        return top
    return TwistdRoot(top, text_log_observer(twistd_options))
