"""
Loaded into a real agent process by the replace drills (through
``AgentProcess(preamble=...)``): the process SIGKILLs itself at one step
of the replace journal, right before or right after that step is written.
Nothing of the package reads it: the agent runs unchanged otherwise.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from plexagent.host.docker.replacejournal import ReplaceJournal


def install(step: str, when: str) -> None:
    """SIGKILL this process ``when`` ("before" or "after") the journal writes ``step``."""
    real = ReplaceJournal.save

    def save(self: Any, written: str) -> None:
        if written == step and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, written)
        if written == step and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    ReplaceJournal.save = save  # type: ignore[method-assign]
