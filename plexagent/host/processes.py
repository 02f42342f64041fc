"""
Running external programs (git, nginx, ufw, systemctl) without blocking the
reactor: a small Deferred facade over ``reactor.spawnProcess``.

``run(argv, env, cwd, timeout)`` fires with a ``ProcessResult`` (exit code,
stdout, stderr); past ``timeout`` seconds the program and everything it
started are killed and the Deferred fails with ``ProcessTimedOut``. Output is
kept up to a bound so a chatty program cannot exhaust memory. Nothing here
logs argv or the environment: callers may pass credentials in ``env``.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Mapping, NamedTuple, Sequence

import psutil
from twisted.internet import defer, error, protocol
from twisted.python.failure import Failure

from plexagent import errors

#: Default bound on each of stdout and stderr.
MAX_OUTPUT = 1 << 20

#: The environment programs get when the caller does not give one.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ProcessResult(NamedTuple):
    exit_code: int  # negative: killed by that signal
    stdout: bytes
    stderr: bytes


class ProcessTimedOut(errors.Unavailable):
    """The program ran past its timeout and was killed (503)."""

    def __init__(self, message: str, details: Any = None, result: ProcessResult | None = None) -> None:
        super().__init__(message, details)
        self.result = result


class _Bounded:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.truncated = False

    def add(self, data: bytes) -> None:
        room = self.limit - self.size
        if room <= 0:
            self.truncated = True
            return
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self.parts.append(data)
        self.size += len(data)

    def value(self) -> bytes:
        return b"".join(self.parts)


class _Collector(protocol.ProcessProtocol):
    def __init__(self, max_output: int) -> None:
        self.stdout = _Bounded(max_output)
        self.stderr = _Bounded(max_output)
        self.ended: defer.Deferred[int] = defer.Deferred()

    def connectionMade(self) -> None:
        # Nothing is ever fed on stdin: a program that prompts sees EOF.
        self.transport.closeStdin()  # type: ignore[union-attr,misc]

    def outReceived(self, data: bytes) -> None:
        self.stdout.add(data)

    def errReceived(self, data: bytes) -> None:
        self.stderr.add(data)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, error.ProcessDone):
            code = 0
        elif getattr(value, "exitCode", None) is not None:
            code = value.exitCode
        elif getattr(value, "signal", None) is not None:
            code = -value.signal
        else:
            code = -1
        self.ended.callback(code)


def _kill_tree(pid: int | None) -> None:
    """SIGKILL ``pid`` and all its descendants (git starts helpers)."""
    if pid is None:
        return
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        children = []
    for proc in [*children]:
        try:
            proc.kill()
        except psutil.Error:
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def run(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = 60.0,
    reactor: Any = None,
    max_output: int = MAX_OUTPUT,
) -> defer.Deferred[ProcessResult]:
    """
    Run ``argv`` (``argv[0]`` found on ``env['PATH']``) and collect its output.

    ``env`` replaces the environment entirely (default: just ``PATH``).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    environment = dict(env) if env is not None else {"PATH": DEFAULT_PATH}
    executable = _which(argv[0], environment.get("PATH", DEFAULT_PATH))
    if executable is None:
        return defer.fail(errors.Unavailable("program not found", f"{argv[0]} is not installed or not on PATH"))
    collector = _Collector(max_output)
    try:
        transport = reactor.spawnProcess(collector, executable, list(argv), env=environment, path=cwd)
    except OSError as e:
        return defer.fail(errors.Unavailable("cannot start program", f"{argv[0]}: {e.strerror}"))
    timed_out = [False]

    def on_timeout() -> None:
        timed_out[0] = True
        _kill_tree(transport.pid)

    timer = reactor.callLater(timeout, on_timeout)

    def finished(code: int) -> ProcessResult:
        if timer.active():
            timer.cancel()
        result = ProcessResult(code, collector.stdout.value(), collector.stderr.value())
        if timed_out[0]:
            raise ProcessTimedOut(
                "program timed out", f"{argv[0]} did not finish within {timeout:g} seconds and was stopped", result
            )
        return result

    return collector.ended.addCallback(finished)


def _which(program: str, path: str) -> str | None:
    if "/" in program:
        return program if os.access(program, os.X_OK) else None
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory, program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None
