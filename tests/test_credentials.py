"""
Credentials re-read without a restart: key files with several keys, the
reloader keeping what cannot be read, SIGHUP (a real signal to this
process) and its chaining, and key rotation on a real agent's listeners.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from plexagent.config import ConfigError, read_key_lines
from plexagent.credentials import CredentialReloader, HangupReload
from plexagent.service import makeService
from plexagent.testing import docker as td
from plexagent.testing.fixtures import AgentSandbox, write_secret_file


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def capture_warnings(testcase: unittest.TestCase) -> list[str]:
    """Every warning the credentials module logs from now on, formatted."""
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "plexagent.credentials" and event.get("log_level") == LogLevel.warn:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def synchronous(fn: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(fn)


class KeyLines(unittest.TestCase):
    def path(self, text: str) -> str:
        path = self.mktemp()
        write(path, text)
        return path

    def test_one_key_a_line_blank_lines_and_whitespace_ignored(self) -> None:
        path = self.path("\n  key-one  \n\n\tkey-two\n")
        self.assertEqual(read_key_lines("agent_api.api_key_file", path), ("key-one", "key-two"))

    def test_lines_starting_with_a_hash_are_comments(self) -> None:
        path = self.path("# rolled in on Monday\nnew-key\n  # old one, remove Friday\nold-key\n")
        self.assertEqual(read_key_lines("agent_api.api_key_file", path), ("new-key", "old-key"))

    def test_a_file_of_comments_only_holds_no_key(self) -> None:
        path = self.path("# nothing yet\n")
        e = self.assertRaises(ConfigError, read_key_lines, "agent_api.api_key_file", path)
        self.assertEqual(str(e), f"agent_api.api_key_file: {path} holds no key (only comments)")


class Reloader(unittest.TestCase):
    def setUp(self) -> None:
        self.reloader = CredentialReloader(reactor, run_in_thread=synchronous)
        self.applied: list[Any] = []
        self.warnings = capture_warnings(self)

    def test_each_credential_is_read_and_applied(self) -> None:
        self.reloader.add("a.key", lambda: "one", self.applied.append)
        self.reloader.add("b.key", lambda: "two", self.applied.append)
        outcome = self.successResultOf(self.reloader.reload())
        self.assertEqual(outcome, {"reloaded": ["a.key", "b.key"], "failed": {}})
        self.assertEqual(self.applied, ["one", "two"])
        self.assertEqual(self.warnings, [])

    def test_what_cannot_be_read_keeps_its_value_and_logs_one_line(self) -> None:
        def unreadable() -> str:
            raise ConfigError("a.key: cannot read /etc/a: Permission denied")

        self.reloader.add("a.key", unreadable, self.applied.append)
        self.reloader.add("b.key", lambda: "two", self.applied.append)
        outcome = self.successResultOf(self.reloader.reload())
        self.assertEqual(outcome, {"reloaded": ["b.key"],
                                   "failed": {"a.key": "a.key: cannot read /etc/a: Permission denied"}})
        self.assertEqual(self.applied, ["two"])
        self.assertEqual(self.warnings,
                         ["reload: a.key: cannot read /etc/a: Permission denied; keeping the a.key in use"])

    def test_an_unexpected_error_is_named_by_its_class_never_its_text(self) -> None:
        def broken() -> str:
            raise ValueError("secret-content-of-the-file")

        self.reloader.add("a.key", broken, self.applied.append)
        outcome = self.successResultOf(self.reloader.reload())
        self.assertEqual(outcome["failed"], {"a.key": "a.key: cannot be loaded (ValueError)"})
        self.assertNotIn("secret-content", repr(outcome) + repr(self.warnings))
        self.assertEqual(len(self.warnings), 1)

    def test_reloads_run_one_at_a_time(self) -> None:
        gate: defer.Deferred[str] = defer.Deferred()
        reads = [gate, defer.succeed("second")]
        reloader = CredentialReloader(reactor, run_in_thread=lambda fn: reads.pop(0))
        reloader.add("a.key", lambda: None, self.applied.append)
        first, second = reloader.reload(), reloader.reload()
        self.assertEqual(self.applied, [])
        gate.callback("first")
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.applied, ["first", "second"])

    def test_next_reload_fires_with_the_outcome(self) -> None:
        d = self.reloader.next_reload()
        self.assertNoResult(d)
        self.reloader.reload()
        self.assertEqual(self.successResultOf(d), {"reloaded": [], "failed": {}})


class Hangup(unittest.TestCase):
    """A real SIGHUP to this process."""

    def setUp(self) -> None:
        self.reloader = CredentialReloader(reactor)
        self.hangup = HangupReload(reactor, self.reloader)
        self.before = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, self.before)

    async def test_sighup_reloads(self) -> None:
        applied: list[str] = []
        self.reloader.add("a.key", lambda: "read", applied.append)
        self.hangup.startService()
        self.addCleanup(self.hangup.stopService)
        d = self.reloader.next_reload()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(await d, {"reloaded": ["a.key"], "failed": {}})
        self.assertEqual(applied, ["read"])

    async def test_a_handler_installed_before_is_still_called(self) -> None:
        seen: list[int] = []
        signal.signal(signal.SIGHUP, lambda signum, frame: seen.append(signum))
        self.hangup.startService()
        self.addCleanup(self.hangup.stopService)
        d = self.reloader.next_reload()
        os.kill(os.getpid(), signal.SIGHUP)
        await d
        self.assertEqual(seen, [signal.SIGHUP])

    async def test_plexagent_reload_with_a_pid_sends_sighup(self) -> None:
        import io

        from plexagent import cli

        self.hangup.startService()
        self.addCleanup(self.hangup.stopService)
        d = self.reloader.next_reload()
        out = io.StringIO()
        self.assertEqual(cli.main(["reload", "--pid", str(os.getpid())], io.StringIO(), out, io.StringIO()), 0)
        await d
        self.assertIn("sent SIGHUP", out.getvalue())

    def test_stopping_puts_the_previous_handler_back(self) -> None:
        def previous(signum: int, frame: Any) -> None:
            pass

        signal.signal(signal.SIGHUP, previous)
        self.hangup.privilegedStartService()
        self.hangup.startService()
        self.assertIsNot(signal.getsignal(signal.SIGHUP), previous)
        self.hangup.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), previous)


class AgentKeyRotation(unittest.TestCase):
    """The agent API's key file, rolled on a real agent and reloaded by SIGHUP."""

    def setUp(self) -> None:
        td.test_client(self)
        self.agent = td.start_agent(self)
        self.api = td.AgentClient(self.agent)
        self.key_file = self.agent.config.agent_api.api_key_file
        self.reloader = self.agent.top.agent.reloader
        hangup = HangupReload(reactor, self.reloader)
        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
        hangup.startService()
        self.addCleanup(hangup.stopService)
        self.warnings = capture_warnings(self)

    async def sighup(self) -> dict[str, Any]:
        d = self.reloader.next_reload()
        os.kill(os.getpid(), signal.SIGHUP)
        return await d

    async def status(self, key: str) -> int:
        code, _ = await self.api.get("/cron/jobs", key=key)
        return code

    async def test_a_rolled_key_is_accepted_after_sighup_and_the_old_refused_only_once_removed(self) -> None:
        old, new = self.agent.api_key, "new-key-" + os.urandom(8).hex()
        self.assertEqual(await self.status(new), 401)
        write(self.key_file, f"{old}\n{new}\n")
        self.assertEqual((await self.sighup())["failed"], {})
        self.assertEqual((await self.status(new), await self.status(old)), (200, 200))
        write(self.key_file, f"# {old[:4]}... retired\n{new}\n")
        await self.sighup()
        self.assertEqual((await self.status(new), await self.status(old)), (200, 401))

    async def test_an_unreadable_key_file_keeps_the_old_keys_and_logs_one_line(self) -> None:
        os.remove(self.key_file)
        outcome = await self.sighup()
        self.assertEqual(list(outcome["failed"]), ["agent_api.api_key_file"])
        self.assertEqual(await self.status(self.agent.api_key), 200)
        self.assertEqual(len(self.warnings), 1)
        self.assertIn(f"agent_api.api_key_file: cannot read {self.key_file}", self.warnings[0])

    async def test_a_key_file_with_no_key_keeps_the_old_keys(self) -> None:
        write(self.key_file, "\n# emptied by mistake\n")
        outcome = await self.sighup()
        self.assertIn("holds no key", outcome["failed"]["agent_api.api_key_file"])
        self.assertEqual(await self.status(self.agent.api_key), 200)
        self.assertNotIn(self.agent.api_key, repr(outcome) + repr(self.warnings))


class BearerRotation(unittest.TestCase):
    """The Local Node API's TCP bearer token, re-read on a reload."""

    async def test_a_new_token_replaces_the_old_one_and_an_unreadable_one_keeps_it(self) -> None:
        import treq

        sandbox = AgentSandbox()
        self.addCleanup(sandbox.cleanup)
        sandbox.enable_http()
        top = makeService(sandbox.config(), reactor)
        top.startService()
        self.addCleanup(top.stopService)
        port = top.getServiceNamed("node_api.http_listen").port.getHost().port
        url = f"http://127.0.0.1:{port}/v1/state/metadata"

        async def status(token: str) -> int:
            response = await treq.get(url, headers={"Authorization": f"Bearer {token}"}, persistent=False)
            await response.content()
            return response.code

        old, new = sandbox.http_token, "new-token-" + os.urandom(8).hex()
        write_secret_file(sandbox.document["node_api"]["http_token_file"], new)
        await top.agent.reloader.reload()
        self.assertEqual((await status(new), await status(old)), (200, 401))
        os.remove(sandbox.document["node_api"]["http_token_file"])
        outcome = await top.agent.reloader.reload()
        self.assertIn("node_api.http_token_file", outcome["failed"])
        self.assertEqual(await status(new), 200)
