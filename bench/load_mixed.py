"""
Load test (not CI): a mixed workload on both APIs at a fixed request rate
for a fixed time, against a real ``twistd plexagent`` with the control-plane
simulator and a real Docker engine behind it.

Reports, per window: requests, errors (must be 0), p50/p99 latency, and the
agent's RSS (must stay flat). Usage (after ``eval "$(bash
scripts/setup-test-env.sh)"``):

    python bench/load_mixed.py [--seconds 600] [--rate 100] [--window 30]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import treq  # noqa: E402
from common import free_port, percentile, rss_mib  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from plexagent.testing import ControlPlaneSimulator  # noqa: E402
from plexagent.testing.fixtures import AgentProcess, AgentSandbox, unix_http_client  # noqa: E402

BASE_IMAGE = os.environ.get("PLEXAGENT_TEST_BASE_IMAGE", "plexagent-test/busybox:latest")


async def main(args: argparse.Namespace) -> None:
    sim = ControlPlaneSimulator.example()
    await sim.start(reactor)
    sandbox = AgentSandbox(control_plane=sim)
    files_root = os.path.join(sandbox.root, "files")
    os.makedirs(files_root)
    agent_port = free_port()
    sandbox.document["agent_api"].update(
        {"enabled": True, "listen": f"127.0.0.1:{agent_port}", "allowed_paths": [files_root + "/"]}
    )
    sandbox.document["docker"] = {"host": os.environ.get("DOCKER_HOST", "")}
    sandbox.document["node"]["access_log"] = False
    proc = AgentProcess(sandbox.write(), reactor)
    proc.start()
    await proc.wait_for_socket(sandbox.socket)
    node = unix_http_client(sandbox.socket, persistent=True)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    agent_http = treq.client.HTTPClient(Agent(reactor, pool=pool))
    agent_base = f"http://127.0.0.1:{agent_port}"
    key = {"X-API-Key": sandbox.api_key}
    for _ in range(200):
        try:
            await agent_http.get(agent_base + "/ping")
            break
        except Exception:
            await task.deferLater(reactor, 0.05, lambda: None)

    names = [f"pa-load-{os.getpid()}-{i}" for i in range(3)]
    for name in names:
        response = await agent_http.post(
            agent_base + "/containers/run",
            json={"name": name, "image": BASE_IMAGE, "command": ["sleep", "100000"]},
            headers=key,
        )
        await response.content()

    counter = itertools.count()
    payload = json.dumps({"content_type": "application/json", "payload": {"status": "ok", "n": 1}}).encode()

    def node_get(path: str) -> Any:
        return lambda: node.get("http://localhost" + path)

    def agent_get(path: str) -> Any:
        return lambda: agent_http.get(agent_base + path, headers=key)

    mix = [
        ("node GET /v1/state", node_get("/v1/state")),
        ("node GET metadata", node_get("/v1/state/metadata/region")),
        ("node PUT report", lambda: node.put(f"http://localhost/v1/state/report/k{next(counter) % 50}", data=payload)),
        ("node GET report", lambda: node.get(f"http://localhost/v1/state/report/k{next(counter) % 50}")),
        ("node GET secret", node_get("/v1/state/secrets/db%2Fpassword")),
        ("agent GET /ping", agent_get("/ping")),
        ("agent GET /containers", agent_get("/containers")),
        ("agent GET status", lambda: agent_http.get(
            agent_base + f"/containers/{names[next(counter) % len(names)]}/status", headers=key)),
        ("agent files write", lambda: agent_http.post(
            agent_base + "/files/write",
            json={"path": os.path.join(files_root, f"f{next(counter) % 20}.txt"), "content": "x" * 512},
            headers=key)),
        ("agent files read", lambda: agent_http.get(
            agent_base + "/files/read", params={"path": os.path.join(files_root, "f0.txt")}, headers=key)),
        ("agent GET /metrics prom", agent_get("/metrics?format=prometheus")),
    ]
    # Prime the files read.
    await (await mix[8][1]()).content()

    windows: list[dict[str, Any]] = []
    current: dict[str, Any] = {"latencies": [], "errors": 0, "codes": {}}
    outstanding = [0]
    in_flight: set[defer.Deferred[Any]] = set()

    async def one(label: str, call: Any) -> None:
        start = time.perf_counter()
        outstanding[0] += 1
        window = current
        try:
            response = await call()
            await response.content()
            ok = 200 <= response.code < 300 or (label == "node GET report" and response.code == 404)
            if not ok:
                window["errors"] += 1
                window["codes"][f"{label} {response.code}"] = window["codes"].get(f"{label} {response.code}", 0) + 1
        except Exception as e:
            window["errors"] += 1
            window["codes"][f"{label} {type(e).__name__}"] = window["codes"].get(f"{label} {type(e).__name__}", 0) + 1
        finally:
            outstanding[0] -= 1
        window["latencies"].append(time.perf_counter() - start)

    cycle = itertools.cycle(mix)

    def fire() -> None:
        label, call = next(cycle)
        d = defer.ensureDeferred(one(label, call))
        in_flight.add(d)
        d.addBoth(lambda _: in_flight.discard(d))

    started = time.monotonic()
    next_window = started + args.window
    ticker = task.LoopingCall(fire)
    ticker.clock = reactor
    ticker.start(1.0 / args.rate)
    try:
        while time.monotonic() - started < args.seconds:
            await task.deferLater(reactor, 0.25, lambda: None)
            if time.monotonic() >= next_window:
                done = current.copy()
                current.clear()
                current.update({"latencies": [], "errors": 0, "codes": {}})
                done["t"] = round(next_window - started)
                done["rss"] = rss_mib(proc.transport.pid)
                windows.append(done)
                next_window += args.window
    finally:
        ticker.stop()
        if in_flight:
            await defer.DeferredList(list(in_flight))
    for name in names:
        response = await agent_http.post(agent_base + f"/containers/{name}/remove?force=true", headers=key)
        await response.content()
    await node.pool.closeCachedConnections()
    await pool.closeCachedConnections()
    proc.kill(15)
    await proc.wait()
    await sim.stop()
    sandbox.cleanup()

    total = sum(len(w["latencies"]) for w in windows)
    errors = sum(w["errors"] for w in windows)
    print(f"Mixed load: {args.rate} req/s for {args.seconds} s over {len(mix)} request kinds "
          f"(both APIs, real Docker, simulator control plane)\n")
    print("| t (s) | requests | errors | p50 ms | p99 ms | agent RSS MiB |")
    print("|---|---|---|---|---|---|")
    for w in windows:
        lat = w["latencies"]
        print(f"| {w['t']} | {len(lat)} | {w['errors']} | {percentile(lat, 50) * 1000:.2f} "
              f"| {percentile(lat, 99) * 1000:.2f} | {w['rss']:.1f} |")
    print(f"\ntotal {total} requests, {errors} errors")
    for w in windows:
        for code, n in w["codes"].items():
            print(f"  t={w['t']}: {code} x{n}")
    if windows:
        print(f"RSS first window {windows[0]['rss']:.1f} MiB, last window {windows[-1]['rss']:.1f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--window", type=float, default=30.0)
    arguments = parser.parse_args()

    def run() -> defer.Deferred[None]:
        d = defer.ensureDeferred(main(arguments))
        d.addErrback(lambda f: (print(f.getTraceback(), file=sys.stderr), None))
        d.addBoth(lambda _: reactor.stop())
        return d

    reactor.callWhenRunning(run)
    reactor.run()
