"""
Benchmark of ``GET /metrics`` on a busy host, each figure beside its
baseline in the same run:

1. Latency of ``GET /metrics`` with N running containers (busybox
   ``sleep``), answered from the agent's background samples, beside the
   old per-request path: list the running containers, then one
   ``stats(stream=False)`` call per container on a pool of
   ``docker.threads`` (10) threads, while the client waits. The baseline is
   timed in-process, without HTTP, which favours it.
2. The agent's idle CPU (user + system time of the ``twistd`` process over
   a window without requests, psutil) at N containers, beside the same
   agent's idle CPU before the containers were started: the difference is
   what sampling costs.
3. The two ways of sampling, each alone in its own process over the same
   window: one-shot calls per round (the agent's way: one round every
   ``--interval`` seconds on ``threads / 2`` threads) and one
   ``stream=True`` stats connection per container (a thread each; Docker
   sends a sample per container every second).

Also reported: how long the agent's latest sampling round took
(``plexagent_container_stats_round_duration_seconds``).

The agent runs as a real daemon (``twistd -n plexagent``) on loopback
against the test Docker daemon (``scripts/setup-test-env.sh``).

    eval "$(bash scripts/setup-test-env.sh)"
    python bench/bench_metrics.py [--containers 50] [--window 60] [--interval 10] [--requests 100]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import docker
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_docker import BASE_IMAGE, Agent  # noqa: E402
from common import percentile  # noqa: E402

LABEL = "plexagent.bench"


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def cpu_percent_over(pid: int, window: float) -> float:
    """The process's CPU use over ``window`` seconds, in % of one core."""
    process = psutil.Process(pid)
    before, started = cpu_seconds(process), time.monotonic()
    time.sleep(window)
    return (cpu_seconds(process) - before) / (time.monotonic() - started) * 100.0


def stats_or_none(client: docker.DockerClient, container_id: str, one_shot: bool) -> dict | None:
    """One stats call; None for a container that stopped meanwhile (other tests share the engine)."""
    try:
        if one_shot:
            return client.api.stats(container_id, stream=False, one_shot=True)
        return client.api.stats(container_id, stream=False)
    except (docker.errors.APIError, ValueError):
        return None


def old_per_request_path(client: docker.DockerClient, threads: int) -> dict:
    """What GET /metrics did before the sampler, per request: list, then a stats call per container."""
    running = [(c["Id"], c["Names"][0].lstrip("/")) for c in client.api.containers()]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda item: stats_or_none(client, item[0], one_shot=False), running))
    return {name: stats for (_, name), stats in zip(running, results, strict=True) if stats is not None}


def sample_one_shot(docker_host: str, window: float, interval: float, threads: int) -> None:
    """The agent's way alone: rounds of one-shot calls on ``threads`` threads, ``interval`` s apart."""
    client = docker.DockerClient(base_url=docker_host, version="auto", max_pool_size=threads)
    end = time.monotonic() + window
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        while time.monotonic() < end:
            ids = [c["Id"] for c in client.api.containers()]
            list(pool.map(lambda cid: stats_or_none(client, cid, one_shot=True), ids))
            time.sleep(max(0.0, min(end - time.monotonic(), interval)))


def sample_streams(docker_host: str, window: float) -> None:
    """The rejected way alone: a ``stream=True`` stats connection (and a thread) per running container."""
    client = docker.DockerClient(base_url=docker_host, version="auto", max_pool_size=1000)
    latest: dict[str, dict] = {}
    stop = threading.Event()

    def follow(cid: str) -> None:
        try:
            for sample in client.api.stats(cid, stream=True, decode=True):
                latest[cid] = sample
                if stop.is_set():
                    return
        except (docker.errors.APIError, ValueError):
            return  # the container stopped (other tests share the engine)

    for c in client.api.containers():
        threading.Thread(target=follow, args=(c["Id"],), daemon=True).start()
    time.sleep(window)
    stop.set()


def measure_child(args: list[str]) -> float:
    """CPU % of one core that ``bench_metrics.py --child <args>`` used over its window (it says)."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, check=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_child(kind: str, docker_host: str, window: float, extra: list[str]) -> None:
    """In the child: sample ``kind``'s way over ``window`` s; print its CPU % of one core (setup excluded)."""
    process = psutil.Process()
    before, started = cpu_seconds(process), time.monotonic()
    if kind == "one-shot":
        sample_one_shot(docker_host, window, float(extra[0]), int(extra[1]))
    else:
        sample_streams(docker_host, window)
    print((cpu_seconds(process) - before) / (time.monotonic() - started) * 100.0)


def metrics(agent: Agent, conn: object) -> dict:
    status, body = agent.request("GET", "/metrics", conn=conn)  # type: ignore[arg-type]
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}: {body[:200]!r}")
    return json.loads(body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--window", type=float, default=60.0, help="seconds of each CPU measurement")
    parser.add_argument("--interval", type=float, default=10.0, help="metrics.stats_interval")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--baseline-requests", type=int, default=3)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    docker_host = os.environ.get("PLEXAGENT_TEST_DOCKER_HOST") or os.environ["DOCKER_HOST"]
    if args.child:
        run_child(args.child[0], docker_host, float(args.child[1]), args.child[2:])
        os._exit(0)  # the stream threads are still reading

    client = docker.DockerClient(base_url=docker_host, version="auto")
    run_id = uuid.uuid4().hex[:8]
    workdir = tempfile.mkdtemp(prefix="pa-bench-metrics-")
    results: dict[str, object] = {"containers": args.containers, "interval": args.interval, "window": args.window}
    agent = Agent(docker_host, workdir, extra_config=f"[metrics]\nstats_interval = {args.interval}\n")
    containers = []
    try:
        others = len(client.api.containers())
        results["other_running_containers_at_start"] = others
        results["agent_idle_cpu_percent_before_containers"] = round(cpu_percent_over(agent.process.pid, args.window), 3)

        for i in range(args.containers):
            containers.append(client.containers.run(
                BASE_IMAGE, ["sleep", "3600"], name=f"pa-bench-metrics-{run_id}-{i}", detach=True,
                labels={LABEL: run_id}))
        names = {c.name for c in containers}
        conn = agent.connection()
        deadline = time.monotonic() + 120 + args.interval
        while True:
            document = metrics(agent, conn)
            if names <= set(document["containers"]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the bench containers were not all sampled in time")
            time.sleep(0.5)
        results["running_containers_sampled"] = len(document["containers"])
        conn.close()  # idle connections are closed after 60 s

        results["agent_idle_cpu_percent_with_containers"] = round(cpu_percent_over(agent.process.pid, args.window), 3)

        conn = agent.connection()
        status, text = agent.request("GET", "/metrics?format=prometheus", conn=conn)
        for line in text.decode().splitlines():
            if line.startswith("plexagent_container_stats_round_duration_seconds "):
                results["agent_round_seconds"] = round(float(line.split()[1]), 2)
        timings = []
        for _ in range(args.requests):
            started = time.perf_counter()
            document = metrics(agent, conn)
            timings.append(time.perf_counter() - started)
            assert names <= set(document["containers"])
        conn.close()
        results["agent_metrics_ms"] = {
            "median": round(statistics.median(timings) * 1000, 2),
            "p95": round(percentile(timings, 95) * 1000, 2),
            "max": round(max(timings) * 1000, 2),
        }
        baseline = []
        for _ in range(args.baseline_requests):
            started = time.perf_counter()
            old_per_request_path(client, 10)
            baseline.append(time.perf_counter() - started)
        results["old_per_request_path_ms"] = {
            "median": round(statistics.median(baseline) * 1000, 1), "max": round(max(baseline) * 1000, 1)}
        agent.stop()
        agent = None

        results["one_shot_rounds_alone_cpu_percent"] = round(
            measure_child(["one-shot", str(args.window), str(args.interval), "5"]), 3)
        results["stream_per_container_alone_cpu_percent"] = round(measure_child(["stream", str(args.window)]), 3)
    finally:
        if agent is not None:
            agent.stop()
        for container in containers:
            try:
                container.remove(force=True)
            except docker.errors.APIError:
                pass
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
