"""
Benchmark: event propagation latency and the cost of report sync.

1. Propagation: a real agent, enrolled with a bootstrap token, follows the
   simulator's event stream; every event is signed as a plexd control plane
   signs it and verified by the agent. The simulator publishes
   ``node_state_updated`` on a fixed schedule, ``--rate`` events a second
   for ``--propagation-seconds`` (open loop: event i at t0 + i/rate, each
   setting ``config``'s version to i), while one persistent socket
   connection polls ``GET /v1/state/data/config`` back to back; the latency
   of event i is the first time a version >= i is seen minus the time i
   was published. Baseline, same run: the poll's round trip alone, no
   events. Target: p99 < 50 ms at 100 events/s. ``--rate 0`` is the older
   mode: one event at a time, ``--events`` of them, each waited for. Also,
   in process: the time to decode and verify one event of 400 B and 64 KiB.
2. Report sync throughput: acknowledged PUTs per second over the socket
   (``--writers`` concurrent clients, ``--seconds`` per run) against an
   agent with no control plane (sync off) and against agents syncing to the
   simulator (sync on), in the same run, alternating. Target: sync costs
   the PUT path < 20%.

Each agent is a real ``twistd -n --pidfile= plexagent`` process; the
simulator and the load generator run in this process.

    PYTHONPATH=. python bench/bench_propagation.py [--rate 100] [--propagation-seconds 30] [--seconds 5] [--writers 32]
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
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else float("nan")


async def connected_agent(reactor: Any, sim: ControlPlaneSimulator, root: str) -> tuple[AgentProcess, str]:
    socket_dir = tempfile.mkdtemp(prefix="pb-", dir="/tmp")
    agent = AgentProcess(reactor, os.path.join(root, "prop"), agent_config_document(
        os.path.join(root, "prop"), sim, socket_dir, report_debounce=5.0))
    await agent.ready()
    deadline = reactor.seconds() + 30
    while sim.open_streams < 1:
        if reactor.seconds() > deadline:
            raise SystemExit("agent never enrolled and subscribed to the event stream")
        await task.deferLater(reactor, 0.01, lambda: None)
    return agent, socket_dir


def state_event(i: int) -> dict[str, Any]:
    return {"metadata": {"region": "bench"}, "data": [{
        "key": "config", "content_type": "application/json", "payload": {"n": i},
        "version": i, "updated_at": "2026-01-01T00:00:00Z"}]}


async def propagation_one_at_a_time(reactor: Any, sim: ControlPlaneSimulator, root: str, events: int) -> list[float]:
    agent, socket_dir = await connected_agent(reactor, sim, root)
    try:
        latencies = []
        for i in range(1, events + 1):
            start = time.perf_counter()
            sim.publish("node_state_updated", state_event(i))
            while True:
                code, body = await agent.client.get("/v1/state/data/config")
                if code == 200 and body["version"] == i:
                    break
            latencies.append((time.perf_counter() - start) * 1000.0)
        return latencies
    finally:
        await agent.stop()
        shutil.rmtree(socket_dir, True)


async def poll_round_trips(agent: AgentProcess, seconds: float) -> list[float]:
    """The baseline: back-to-back polls over the same connection, no events."""
    trips = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        await agent.client.get("/v1/state/data/config")
        trips.append((time.perf_counter() - start) * 1000.0)
    return trips


async def propagation_at_rate(reactor: Any, sim: ControlPlaneSimulator, root: str, rate: float,
                              seconds: float) -> tuple[list[float], list[float], int]:
    """(latencies in ms, baseline poll round trips in ms, events dropped by the agent)."""
    agent, socket_dir = await connected_agent(reactor, sim, root)
    try:
        baseline = await poll_round_trips(agent, 3.0)
        count = int(rate * seconds)
        published: dict[int, float] = {}
        t0 = time.perf_counter() + 0.2

        def publish(i: int) -> None:
            published[i] = time.perf_counter()
            sim.publish("node_state_updated", state_event(i))

        for i in range(1, count + 1):
            # Open loop: the schedule does not wait for the agent.
            reactor.callLater(max(0.0, t0 + (i - 1) / rate - time.perf_counter()), publish, i)
        latencies: dict[int, float] = {}
        seen = 0
        deadline = t0 + seconds + 30
        while seen < count and time.perf_counter() < deadline:
            code, body = await agent.client.get("/v1/state/data/config")
            now = time.perf_counter()
            if code != 200:
                continue
            version = body["version"]
            for i in range(seen + 1, version + 1):
                if i in published:
                    latencies[i] = (now - published[i]) * 1000.0
            seen = max(seen, version)
        if seen < count:
            raise SystemExit(f"only {seen} of {count} events reached the socket")
        code, status = await agent.client.get("/plexagent/status")
        dropped = sum(status["events"]["dropped"].values())
        return [latencies[i] for i in sorted(latencies)], baseline, dropped
    finally:
        await agent.stop()
        shutil.rmtree(socket_dir, True)


def verify_cost(size: int, repeat: int = 200) -> tuple[float, int]:
    """(microseconds to decode and verify one signed event of about ``size`` bytes, its size), in process."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from plexagent.controlplane import gojson
    from plexagent.controlplane.gojson import GoTime
    from plexagent.controlplane.keys import KeySet
    from plexagent.controlplane.plexd_events import PlexdEventCodec, sign_plexd_event
    from plexagent.testing.plexd_sim import public_b64

    key = Ed25519PrivateKey.generate()
    keys = KeySet.from_strings(public_b64(key))
    now = time.time_ns()
    pad = "x" * max(0, size - 330)
    payload = gojson.marshal({"metadata": {"region": "bench", "pad": pad}, "data": [
        {"key": "config", "content_type": "application/json", "payload": {"n": 1}, "version": 1,
         "updated_at": "2026-01-01T00:00:00Z"}]})
    wires = [sign_plexd_event(key, "node_state_updated", str(i), GoTime.from_unix_ns(now), f"n-{i}", payload)[0]
             for i in range(repeat)]
    codec = PlexdEventCodec()
    start = time.perf_counter()
    for wire in wires:
        codec.verify(codec.decode(wire), keys, now)
    return (time.perf_counter() - start) / repeat * 1e6, len(wires[0])


async def put_throughput(reactor: Any, agent: AgentProcess, seconds: float, writers: int, tag: str) -> float:
    acked = 0
    stop_at = time.perf_counter() + seconds

    async def writer(w: int) -> None:
        nonlocal acked
        n = 0
        while time.perf_counter() < stop_at:
            # The same 6,400 keys every round: the report quota (10,000 entries) is not the subject here.
            code, _ = await agent.client.put_report(f"w{w}/k{n % 200}", {"n": n, "tag": tag, "pad": "x" * 200})
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
        if args.rate > 0:
            latencies, baseline, dropped = await propagation_at_rate(reactor, sim, root, args.rate,
                                                                    args.propagation_seconds)
        else:
            latencies, baseline, dropped = await propagation_one_at_a_time(reactor, sim, root, args.events), [], 0
        costs = [verify_cost(400), verify_cost(64 * 1024, repeat=50)]

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
    if args.rate > 0:
        print(f"Propagation: node_state_updated published -> readable on the socket, {args.rate:g} events/s "
              f"for {args.propagation_seconds:g} s ({len(latencies)} events, signed and verified; "
              f"{dropped} dropped by the agent)")
    else:
        print(f"Propagation: node_state_updated published -> readable on the socket, one at a time "
              f"({len(latencies)} events, signed and verified)")
    print("| measure | p50 | p90 | p99 | max |")
    print("|---|---|---|---|---|")
    rows = [("event -> socket", latencies)] + ([("baseline: poll round trip, no events", baseline)] if baseline else [])
    for name, values in rows:
        print(f"| {name} | {percentile(values, 50):.2f} ms | {percentile(values, 90):.2f} ms | "
              f"{percentile(values, 99):.2f} ms | {max(values):.2f} ms |")
    print()
    for (micros, size) in costs:
        print(f"decode + verify one event of {size} bytes: {micros:.0f} us")
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
    parser.add_argument("--rate", type=float, default=100.0,
                        help="events published per second (0: one at a time, --events of them)")
    parser.add_argument("--propagation-seconds", type=float, default=30.0, help="how long to publish at --rate")
    parser.add_argument("--events", type=int, default=1000, help="events with --rate 0")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))
