"""
Crash tests: a real ``twistd plexagent`` process, a storm of report writes
over its Unix socket, SIGKILL (also during a control-plane outage), restart.
Every acknowledged change must reach the control plane.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from twisted.internet import defer, error, protocol, reactor
from twisted.python import procutils

from plexagent.testing.simulator import ControlPlaneSimulator
from tests.controlplane.harness import AgentTestCase, SocketClient, agent_config_document, eventually, short_socket_dir
from tests.controlplane.protocols import for_each_protocol

WORKTREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def toml(document: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "".join(
        f"[{section}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items()) + "\n"
        for section, table in document.items()
    )


class _AgentProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


def payloads(n: int) -> list[Any]:
    """What a storm writer puts under its n-th key, in order."""
    return ["first", {"second": n}]


def sent_deletes(sim: ControlPlaneSimulator) -> set[str]:
    """Every report delete the control plane received (a batch member, or one call per key)."""
    return ({k for post in sim.report_posts for k in post["deleted"]}
            | {key for method, key, _ in sim.report_calls if method == "DELETE"})


def report_requests(sim: ControlPlaneSimulator) -> int:
    return len(sim.report_posts) + len(sim.report_calls)


class Storm:
    """Concurrent writers over the socket, recording what was acknowledged."""

    def __init__(self, client: SocketClient, prefix: str, writers: int = 16) -> None:
        self.client = client
        self.prefix = prefix
        self.writers = writers
        #: key -> how many of its payloads were acknowledged (1: "first", 2: {"second": n})
        self.acked_puts: dict[str, int] = {}
        self.acked_deletes: set[str] = set()
        self.acks = 0
        self.stopped = False

    async def writer(self, w: int) -> None:
        n = 0
        while not self.stopped:
            # A key every protocol carries (plexsphere's grammar has no "/").
            key, index = f"{self.prefix}-w{w}-k{n}", n
            n += 1
            try:
                for number, payload in enumerate(payloads(index), 1):
                    code, body = await self.client.put_report(key, payload)
                    if code != 200:
                        raise AssertionError(f"PUT {key} answered {code}")
                    self.acked_puts[key] = number
                    self.acks += 1
                if n % 4 == 0:
                    code, _ = await self.client.delete_report(key)
                    if code != 204:
                        raise AssertionError(f"DELETE {key} answered {code}")
                    self.acked_deletes.add(key)
                    self.acks += 1
            except AssertionError:
                raise
            except Exception:
                return  # the agent died under us: whatever was not answered is not asserted

    def run(self) -> defer.Deferred[Any]:
        return defer.gatherResults(
            [defer.ensureDeferred(self.writer(w)) for w in range(self.writers)], consumeErrors=True
        )


@for_each_protocol()
class CrashTests:
    testcase_base = AgentTestCase
    timeout = 180

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        self.socket_dir = short_socket_dir()
        self.addCleanup(shutil.rmtree, self.socket_dir, True)
        self.processes: list[Any] = []
        self.addCleanup(self._kill_all)

    async def _kill_all(self) -> None:
        for transport, proto in self.processes:
            if transport.pid is not None:
                try:
                    transport.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass
            await proto.ended

    async def launch(self, sim: ControlPlaneSimulator, **cp: Any) -> tuple[Any, SocketClient]:
        document = agent_config_document(self.base, sim, self.socket_dir, **cp)
        path = os.path.join(self.base, "plexagent.toml")
        with open(path, "w") as f:
            f.write(toml(document))
        twistd = procutils.which("twistd")[0]
        env = dict(os.environ, PYTHONPATH=WORKTREE + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proto = _AgentProcess()
        transport = reactor.spawnProcess(
            proto, sys.executable, [sys.executable, twistd, "-n", "--pidfile=", "plexagent", "--config", path],
            env=env, path=self.base,
        )
        self.processes.append((transport, proto))
        client = SocketClient(document["node_api"]["socket"])
        self.addCleanup(client.close)

        async def answers() -> bool:
            try:
                code, _ = await client.get("/v1/state")
                return code == 200
            except Exception:
                return False

        deadline = reactor.seconds() + 30
        while not await answers():
            if proto.ended.called:
                raise AssertionError("agent exited at start:\n" + proto.output.decode(errors="replace"))
            if reactor.seconds() > deadline:
                raise AssertionError("agent socket never answered")
            await eventually(lambda: True)
        return (transport, proto), client

    async def kill(self, process: Any) -> None:
        transport, proto = process
        transport.signalProcess("KILL")
        reason = await proto.ended
        self.assertIsInstance(reason, error.ProcessTerminated)

    async def storm_then_kill(self, client: SocketClient, process: Any, acks: int, prefix: str = "s") -> Storm:
        storm = Storm(client, prefix)
        running = storm.run()
        await eventually(lambda: storm.acks >= acks, timeout=60, what=f"{acks} acknowledged writes")
        await self.kill(process)
        storm.stopped = True
        await running
        return storm

    def undelivered(self, sim: ControlPlaneSimulator, *storms: Storm) -> list[str]:
        """Acknowledged changes the control plane does not have (empty: all there)."""
        reported = sim.reported()
        deletes = sent_deletes(sim)
        missing = []
        for storm in storms:
            for key, number in storm.acked_puts.items():
                if key in storm.acked_deletes:
                    continue
                # The payload the control plane holds is the one acknowledged last, or a later one
                # (made durable, then cut off by the kill before it was answered).
                written = payloads(int(key.rsplit("-k", 1)[1]))
                held = reported[key]["payload"] if key in reported else None
                if held in written and written.index(held) + 1 >= number:
                    continue
                # A DELETE cut off by the kill may still have been made
                # durable (and so synced) without being answered: keys are
                # never re-created, so a sent delete is the newer change.
                if key not in reported and key in deletes:
                    continue
                missing.append(f"PUT {key} #{number}")
            for key in storm.acked_deletes:
                if key not in deletes or key in reported:
                    missing.append(f"DELETE {key}")
        return missing

    async def assertDelivered(self, sim: ControlPlaneSimulator, *storms: Storm, timeout: float = 60) -> None:
        try:
            await eventually(lambda: not self.undelivered(sim, *storms), timeout=timeout,
                             what="every acknowledged change")
        except AssertionError:
            missing = self.undelivered(sim, *storms)
            self.fail(f"{len(missing)} acknowledged changes never reached the control plane, "
                      f"e.g. {missing[:5]}; {report_requests(sim)} report requests received")

    def assertNoSecretsIn(self, sim: ControlPlaneSimulator, output: bytes) -> None:
        for secret in [sim.token, sim.nsk_b64, *sim.bootstrap_tokens]:
            self.assertNotIn(secret.encode(), output)

    async def test_sigkill_during_a_storm_loses_no_acknowledged_change(self) -> None:
        sim = await self.start_sim()
        process, client = await self.launch(sim, report_debounce=0.05)
        storm = await self.storm_then_kill(client, process, acks=600)
        restarted, client = await self.launch(sim, report_debounce=0.05)
        await self.assertDelivered(sim, storm)
        self.assertGreater(len(storm.acked_deletes), 0)
        await self.kill(restarted)
        self.assertNoSecretsIn(sim, process[1].output + restarted[1].output)
        self.assertEqual(len(sim.registrations), 1)  # enrolled once, whatever the restarts

    async def test_sigkill_before_any_sync_sends_everything_after_restart(self) -> None:
        sim = await self.start_sim()
        process, client = await self.launch(sim, report_debounce=300.0)
        # Enrolled (changes made before it are sent at once, as after a restart).
        await eventually(lambda: sim.open_streams == 1, timeout=30, what="agent enrolled and connected")
        storm = await self.storm_then_kill(client, process, acks=300)
        self.assertEqual(report_requests(sim), 0)
        restarted, client = await self.launch(sim, report_debounce=300.0)
        await self.assertDelivered(sim, storm)
        await self.kill(restarted)
        self.assertEqual(len(sim.registrations), 1)

    async def test_sigkill_during_a_control_plane_outage_loses_nothing(self) -> None:
        sim = await self.start_sim()
        process, client = await self.launch(sim, report_debounce=0.05)
        await eventually(lambda: sim.open_streams == 1, timeout=30, what="agent connected")
        await sim.stop()
        storm = await self.storm_then_kill(client, process, acks=400)
        restarted, client = await self.launch(sim, report_debounce=0.05)
        # Still down after the restart: the backlog waits on disk.
        more = await self.storm_then_kill(client, restarted, acks=100, prefix="t")
        await sim.start(reactor)
        final, client = await self.launch(sim, report_debounce=0.05)
        await self.assertDelivered(sim, storm, more, timeout=90)
        await self.kill(final)
        self.assertEqual(len(sim.registrations), 1)
