"""
Benchmark: event propagation latency and the cost of report sync.

1. Propagation: the simulator publishes a signed ``node_state_updated``
   event; we time until the new value is readable on the agent's Unix
   socket (polled back to back over one persistent connection). p50/p99
   over ``--events`` events. Target: p99 < 50 ms.
2. Report sync throughput: acknowledged PUTs per second over the socket
   (``--writers`` concurrent clients, ``--seconds`` per run) against an
   agent with no control plane (sync off) and against agents syncing to the
   simulator (sync on), in the same run, alternating. Target: sync costs
   the PUT path < 20%.

Each agent is a real ``twistd -n --pidfile= plexagent`` process; the
simulator and the load generator run in this process.

    PYTHONPATH=. python bench/bench_propagation.py [--events 1000] [--seconds 5] [--writers 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, protocol, task

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from plexagent.testing.simulator import ControlPlaneSimulator  # noqa: E402
from tests.controlplane.harness import SocketClient, agent_config_document  # noqa: E402
from tests.controlplane.test_crash import toml  # noqa: E402


class _Proc(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data[-65536:]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class AgentProcess:
    def __init__(self, reactor: Any, base: str, document: dict[str, Any]) -> None:
        self.reactor = reactor
        self.document = document
        os.makedirs(base, exist_ok=True)
        path = os.path.join(base, "plexagent.toml")
        with open(path, "w") as f:
            f.write(toml(document))
        twistd = shutil.which("twistd")
        env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proto = _Proc()
        self.transport = reactor.spawnProcess(
            self.proto, sys.executable, [sys.executable, twistd, "-n", "--pidfile=", "plexagent", "--config", path],
            env=env, path=base,
        )
        self.client = SocketClient(document["node_api"]["socket"])

    async def ready(self) -> None:
        deadline = self.reactor.seconds() + 30
        while True:
            try:
                code, _ = await self.client.get("/v1/state")
                if code == 200:
                    return
            except Exception:
                pass
            if self.proto.ended.called or self.reactor.seconds() > deadline:
                raise SystemExit("agent did not start:\n" + self.proto.output.decode(errors="replace"))
            await task.deferLater(self.reactor, 0.05, lambda: None)

    async def stop(self) -> None:
        await self.client.close()
        self.transport.signalProcess("TERM")
        await self.proto.ended


def standalone_document(base: str, socket_dir: str) -> dict[str, Any]:
    return {
        "node": {"data_dir": os.path.join(base, "data"), "shutdown_timeout": 1.0},
        "node_api": {"socket": os.path.join(socket_dir, "api.sock"), "socket_group": "", "secrets_group": ""},
        "agent_api": {"enabled": False},
    }


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def propagation(reactor: Any, sim: ControlPlaneSimulator, root: str, events: int) -> list[float]:
    socket_dir = tempfile.mkdtemp(prefix="pb-", dir="/tmp")
    agent = AgentProcess(reactor, os.path.join(root, "prop"), agent_config_document(
        os.path.join(root, "prop"), sim, socket_dir, report_debounce=5.0))
    try:
        await agent.ready()
        deadline = reactor.seconds() + 30
        while sim.open_streams < 1:
            if reactor.seconds() > deadline:
                raise SystemExit("agent never subscribed to the event stream")
            await task.deferLater(reactor, 0.01, lambda: None)
        latencies = []
        for i in range(1, events + 1):
            payload = {"metadata": {"region": "bench"}, "data": [{
                "key": "config", "content_type": "application/json", "payload": {"n": i},
                "version": i, "updated_at": "2026-01-01T00:00:00Z"}]}
            start = time.perf_counter()
            sim.publish("node_state_updated", payload)
            while True:
                code, body = await agent.client.get("/v1/state/data/config")
                if code == 200 and body["version"] == i:
                    break
            latencies.append((time.perf_counter() - start) * 1000.0)
        return latencies
    finally:
        await agent.stop()
        shutil.rmtree(socket_dir, True)


async def put_throughput(reactor: Any, agent: AgentProcess, seconds: float, writers: int, tag: str) -> float:
    acked = 0
    stop_at = time.perf_counter() + seconds

    async def writer(w: int) -> None:
        nonlocal acked
        n = 0
        while time.perf_counter() < stop_at:
            code, _ = await agent.client.put_report(f"{tag}/w{w}/k{n % 200}", {"n": n, "pad": "x" * 200})
            n += 1
            if code != 200:
                raise SystemExit(f"PUT answered {code}")
            acked += 1

    start = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(writer(w)) for w in range(writers)])
    return acked / (time.perf_counter() - start)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    root = tempfile.mkdtemp(prefix="plexagent-bench-")
    sim = ControlPlaneSimulator.example()
    await sim.start(reactor)
    try:
        latencies = await propagation(reactor, sim, root, args.events)

        configs = {
            "sync off (standalone)": None,
            "sync on, report_debounce 5.0 (default)": 5.0,
            "sync on, report_debounce 0.1": 0.1,
        }
        agents = {}
        for i, (name, debounce) in enumerate(configs.items()):
            base = os.path.join(root, f"tp{i}")
            socket_dir = tempfile.mkdtemp(prefix="pb-", dir="/tmp")
            if debounce is None:
                document = standalone_document(base, socket_dir)
                os.makedirs(base, exist_ok=True)
            else:
                document = agent_config_document(base, sim, socket_dir, report_debounce=debounce)
            agents[name] = AgentProcess(reactor, base, document)
        for agent in agents.values():
            await agent.ready()
        results: dict[str, list[float]] = {name: [] for name in agents}
        names = list(agents)
        for round_ in range(args.rounds):
            # Rotate who goes first: the machine's load drifts during a run.
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                results[name].append(
                    await put_throughput(reactor, agents[name], args.seconds, args.writers, f"r{round_}")
                )
        posts = len(sim.report_posts)
        for agent in agents.values():
            await agent.stop()
    finally:
        await sim.stop()
        shutil.rmtree(root, True)

    print()
    print(f"Propagation: node_state_updated published -> readable on the socket ({args.events} events)")
    print("| p50 | p90 | p99 | max |")
    print("|---|---|---|---|")
    print(f"| {percentile(latencies, 50):.2f} ms | {percentile(latencies, 90):.2f} ms | "
          f"{percentile(latencies, 99):.2f} ms | {max(latencies):.2f} ms |")
    print()
    print(f"Report PUT throughput ({args.writers} concurrent writers, {args.seconds:g} s x {args.rounds} rounds, "
          f"median; {posts} report POSTs received by the simulator)")
    print("| agent | acknowledged PUTs/s (median) | min - max | vs sync off |")
    print("|---|---|---|---|")
    baseline = statistics.median(results["sync off (standalone)"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {min(values):.0f} - {max(values):.0f} | "
              f"{100 * (median - baseline) / baseline:+.1f}% |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))
