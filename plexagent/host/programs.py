"""
The host's programs (nginx, systemctl, ufw) as the agent runs them: through
``processes.run`` (never a shell), with a fixed, small environment so that
their output is parseable (C locale, UTC timestamps) and the PATH the
configuration names.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import defer

from plexagent.host import processes


class Programs:
    """Runs host programs with the agent's PATH and a parse-friendly locale."""

    def __init__(self, reactor: Any, path: str = "", timeout: float = 60.0) -> None:
        self.reactor = reactor
        self.path = path or processes.DEFAULT_PATH
        self.timeout = timeout

    @property
    def environment(self) -> dict[str, str]:
        return {"PATH": self.path, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}

    def run(self, argv: Sequence[str], timeout: float | None = None) -> defer.Deferred[processes.ProcessResult]:
        """``argv`` (``argv[0]`` found on this PATH); its exit code and output."""
        return processes.run(
            list(argv), env=self.environment, timeout=timeout or self.timeout, reactor=self.reactor
        )
