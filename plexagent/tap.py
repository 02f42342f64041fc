"""The twistd command line: ``--config PATH``; errors stop startup in one line."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.python import usage

from plexagent.config import ConfigError, load_config


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Path of the TOML configuration file (default: built-in defaults)."],
    ]

    def opt_version(self) -> None:
        """Display plexagent's version (and the Twisted it runs on) and exit."""
        from twisted import copyright

        from plexagent import __version__

        print(f"plexagent {__version__} (Twisted {copyright.version})")
        sys.exit(0)


def makeService(options: Options, reactor: Any = None, environ: Any = None) -> Any:
    from plexagent import service

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        config = load_config(options["config"], os.environ if environ is None else environ)
        top = service.makeService(config, reactor)
    except ConfigError as e:
        # One line naming the key or path; twistd exits non-zero.
        print(f"plexagent: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    service.GracefulTermination(reactor).setServiceParent(top)
    return top
