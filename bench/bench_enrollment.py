"""
Benchmark: from start to the first state served, for a node that enrolls.

Each run: a fresh data directory and bootstrap token, the control-plane
simulator on loopback (in this process), a real ``twistd -n --pidfile=
plexagent`` process with only ``control_plane.url`` and
``bootstrap_token_file`` set; the clock runs from the spawn until
``GET /v1/state/metadata`` on its Unix socket returns the simulator's
metadata (enrolled, identity saved, state fetched and served). Baseline,
same run, alternating: the same spawn standalone, until its socket answers
(the interpreter and Twisted starting). Target: enrollment and first state
served within 2 s of start.

    PYTHONPATH=. python bench/bench_enrollment.py [--runs 10]
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

from twisted.internet import defer, task

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from bench_propagation import AgentProcess, standalone_document  # noqa: E402

from plexagent.testing.simulator import ControlPlaneSimulator  # noqa: E402
from tests.controlplane.harness import agent_config_document  # noqa: E402


async def until(reactor: Any, agent: AgentProcess, done: Any, timeout: float = 30.0) -> float:
    """Seconds from now (the spawn) until ``done(code, body)`` holds for GET /v1/state/metadata."""
    start = time.perf_counter()
    while True:
        try:
            code, body = await agent.client.get("/v1/state/metadata")
            if done(code, body):
                return time.perf_counter() - start
        except Exception:  # the socket is not there yet
            pass
        if agent.proto.ended.called or time.perf_counter() - start > timeout:
            raise SystemExit("agent did not get there:\n" + agent.proto.output.decode(errors="replace"))
        await task.deferLater(reactor, 0.005, lambda: None)


async def one_run(reactor: Any, sim: ControlPlaneSimulator, root: str, n: int, enroll: bool) -> float:
    base = os.path.join(root, f"{'enroll' if enroll else 'standalone'}-{n}")
    socket_dir = tempfile.mkdtemp(prefix="pe-", dir="/tmp")
    try:
        if enroll:
            document = agent_config_document(base, sim, socket_dir)
            expected = sim.node.metadata
            agent = AgentProcess(reactor, base, document)
            elapsed = await until(reactor, agent, lambda code, body: code == 200 and body == expected)
            if not os.path.exists(os.path.join(base, "data", "identity.json")):
                raise SystemExit("state served without an identity on disk")
        else:
            os.makedirs(base, exist_ok=True)
            agent = AgentProcess(reactor, base, standalone_document(base, socket_dir))
            elapsed = await until(reactor, agent, lambda code, body: code == 200)
        await agent.stop()
        return elapsed
    finally:
        shutil.rmtree(socket_dir, True)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    root = tempfile.mkdtemp(prefix="plexagent-bench-")
    sim = ControlPlaneSimulator.example()
    await sim.start(reactor)
    enrolled, standalone = [], []
    try:
        for n in range(args.runs):
            # Alternate, so both see the same drift in the machine's load.
            enrolled.append(await one_run(reactor, sim, root, n, enroll=True))
            standalone.append(await one_run(reactor, sim, root, n, enroll=False))
    finally:
        await sim.stop()
        shutil.rmtree(root, True)
    registrations = len(sim.registrations)
    differences = [e - s for e, s in zip(enrolled, standalone, strict=True)]
    print()
    print(f"Start -> first state served ({args.runs} runs, {registrations} registrations)")
    print("| measure | median | max |")
    print("|---|---|---|")
    for name, values in (("enroll + fetch + serve (from spawn)", enrolled),
                         ("baseline: standalone, socket answers (from spawn)", standalone),
                         ("difference, run by run", differences)):
        print(f"| {name} | {statistics.median(values):.3f} s | {max(values):.3f} s |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))
