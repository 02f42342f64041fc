"""
Benchmark of the agent API's Docker routes, each beside its baseline in
the same run:

1. ``GET /containers`` and ``GET /containers/<n>/status`` latency with 20
   containers, beside the seed's original approach: spawning the ``docker``
   CLI per request (``docker ps -a --format json`` / ``docker inspect``).
   Only the CLI's own run time is counted for the baseline; the agent is
   timed end to end over HTTP (keep-alive), so the comparison favours the
   baseline.
2. Image load throughput through ``POST /docker/load/stream`` beside a
   direct ``docker load -i`` of the same tar (the image is removed before
   each load, so both load from scratch), and the agent's peak RSS
   (``VmHWM`` of the agent process) during the streamed load.

The agent runs as a real daemon (``twistd -n plexagent``) on loopback
against the test Docker daemon (``scripts/setup-test-env.sh``).

    eval "$(bash scripts/setup-test-env.sh)"
    python bench/bench_docker.py [--size-mib 1024] [--requests 200] [--containers 20]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import docker

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASE_IMAGE = os.environ.get("PLEXAGENT_TEST_BASE_IMAGE", "plexagent-test/busybox:latest")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Agent:
    """``twistd -n plexagent`` with a temporary config, on loopback."""

    def __init__(self, docker_host: str, workdir: str, extra_config: str = "") -> None:
        self.workdir = workdir
        self.port = free_port()
        token = "bench-" + uuid.uuid4().hex
        self.key = hmac.new(token.encode(), b"node-agent:", hashlib.sha256).hexdigest()
        key_file = os.path.join(workdir, "api-key")
        with open(key_file, "w") as f:
            f.write(self.key)
        os.chmod(key_file, 0o600)
        config = os.path.join(workdir, "plexagent.toml")
        with open(config, "w") as f:
            f.write(
                f'[node]\ndata_dir = "{workdir}/data"\n'
                f'[node_api]\nsocket = "{workdir}/api.sock"\n'
                f'[agent_api]\nlisten = "127.0.0.1:{self.port}"\napi_key_file = "{key_file}"\n'
                f'[docker]\nhost = "{docker_host}"\n' + extra_config
            )
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(os.path.join(workdir, "agent.log"), "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "plexagent", "--config", config],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/ping")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the agent did not start; see " + self.log.name)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def request(self, method: str, path: str, body: object = None, conn: http.client.HTTPConnection | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        own = conn is None
        conn = conn or self.connection()
        try:
            conn.request(method, path, body=body, headers={"X-API-Key": self.key, **(headers or {})})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            if own:
                conn.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def serve_cli_baseline(port: int) -> None:
    """
    The seed's original approach, for the baseline: an HTTP server that
    spawns the ``docker`` CLI for each request (threaded, keep-alive).
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without this, Nagle and
        # delayed ACKs would add ~40 ms and flatter the agent.
        disable_nagle_algorithm = True

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            parts = self.path.strip("/").split("/")
            if parts == ["containers"]:
                out = subprocess.run(["docker", "ps", "-a", "--no-trunc", "--format", "{{json .}}"],
                                     capture_output=True, check=True).stdout
                doc: object = {"containers": [json.loads(line) for line in out.splitlines() if line.strip()]}
            elif len(parts) == 3 and parts[0] == "containers" and parts[2] == "status":
                out = subprocess.run(["docker", "inspect", "--format", "{{json .}}", parts[1]],
                                     capture_output=True, check=True).stdout
                info = json.loads(out)
                doc = {"id": info["Id"], "name": info["Name"].lstrip("/"), "state": info["State"]["Status"],
                       "health_status": (info["State"].get("Health") or {}).get("Status", "none")}
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


class CliBaseline:
    """``serve_cli_baseline`` in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, __file__, "--serve-cli-baseline", str(self.port)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the CLI baseline server did not start")

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(values) * 1000, "p95_ms": percentile(values, 95) * 1000}


def bench_latency(agent: Agent, baseline: CliBaseline, names: list[str], requests: int) -> dict[str, object]:
    """Agent vs CLI-per-request server, both end to end over HTTP keep-alive, interleaved."""
    agent_conn, cli_conn = agent.connection(), baseline.connection()

    def get(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> float:
        start = time.perf_counter()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        elapsed = time.perf_counter() - start
        assert response.status == 200, (path, response.status)
        return elapsed

    results: dict[str, object] = {}
    for label, path in [
        ("GET /containers", lambda i: "/containers"),
        ("GET /containers/<n>/status", lambda i: f"/containers/{names[i % len(names)]}/status"),
    ]:
        for i in range(5):  # warm up both
            get(agent_conn, path(i), {"X-API-Key": agent.key})
            get(cli_conn, path(i), {})
        agent_times, cli_times = [], []
        for i in range(requests):
            agent_times.append(get(agent_conn, path(i), {"X-API-Key": agent.key}))
            cli_times.append(get(cli_conn, path(i), {}))
        a, c = summary(agent_times), summary(cli_times)
        results[label] = {
            "agent": {k: round(v, 2) for k, v in a.items()},
            "docker_cli_per_request": {k: round(v, 2) for k, v in c.items()},
            "speedup_median": round(c["median_ms"] / a["median_ms"], 2),
            "speedup_p95": round(c["p95_ms"] / a["p95_ms"], 2),
        }
    agent_conn.close()
    cli_conn.close()
    return results


def make_big_image(client: docker.DockerClient, size_mib: int, workdir: str) -> tuple[str, str]:
    reference = f"pa-bench/big:{size_mib}m"
    context = os.path.join(workdir, "big")
    os.makedirs(context)
    with open(os.path.join(context, "Dockerfile"), "w") as f:
        # Random bytes: nothing in the path can win by compressing them.
        f.write(f"FROM {BASE_IMAGE}\nRUN head -c {size_mib * 1024 * 1024} /dev/urandom > /big\n")
    client.images.build(path=context, tag=reference, rm=True)
    tar = os.path.join(workdir, "big.tar")
    subprocess.run(["docker", "save", "-o", tar, reference], check=True)
    return reference, tar


def remove_image(client: docker.DockerClient, reference: str) -> None:
    try:
        client.api.remove_image(reference, force=True)
    except docker.errors.NotFound:
        pass


def stream_file(agent: Agent, path: str) -> tuple[int, bytes]:
    size = os.path.getsize(path)
    conn = agent.connection()
    try:
        with open(path, "rb") as f:
            conn.request("POST", "/docker/load/stream", body=f,
                         headers={"X-API-Key": agent.key, "Content-Type": "application/x-tar",
                                  "Content-Length": str(size)})
            response = conn.getresponse()
            return response.status, response.read()
    finally:
        conn.close()


def bench_load(agent: Agent, client: docker.DockerClient, size_mib: int, workdir: str, rounds: int) -> dict[str, object]:
    reference, tar = make_big_image(client, size_mib, workdir)
    size = os.path.getsize(tar)
    direct, streamed = [], []
    rss_before = vm_rss_kib(agent.process.pid)
    peak_sampled = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_sampled[0] = max(peak_sampled[0], vm_rss_kib(agent.process.pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(rounds):
        remove_image(client, reference)
        start = time.perf_counter()
        subprocess.run(["docker", "load", "-q", "-i", tar], check=True, capture_output=True)
        direct.append(time.perf_counter() - start)
        remove_image(client, reference)
        start = time.perf_counter()
        status, body = stream_file(agent, tar)
        streamed.append(time.perf_counter() - start)
        assert status == 200, (status, body[:500])
        assert reference in json.loads(body)["images"], body[:500]
    stop.set()
    sampler.join()
    remove_image(client, reference)
    mib = size / (1024 * 1024)
    best_direct, best_streamed = min(direct), min(streamed)
    return {
        "tar_mib": round(mib, 1),
        "rounds": rounds,
        "docker_load_s": [round(t, 2) for t in direct],
        "agent_stream_s": [round(t, 2) for t in streamed],
        "docker_load_mib_s": round(mib / best_direct, 1),
        "agent_stream_mib_s": round(mib / best_streamed, 1),
        "agent_vs_direct": round(best_direct / best_streamed, 3),
        "agent_rss_before_mib": round(rss_before / 1024, 1),
        "agent_peak_rss_mib": round(max(vm_hwm_kib(agent.process.pid), peak_sampled[0]) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--serve-cli-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_cli_baseline:
        serve_cli_baseline(args.serve_cli_baseline)
        return

    host = os.environ.get("PLEXAGENT_TEST_DOCKER_HOST") or os.environ.get("DOCKER_HOST")
    if not host:
        sys.exit("set DOCKER_HOST (eval \"$(bash scripts/setup-test-env.sh)\")")
    client = docker.DockerClient(base_url=host, version="auto", timeout=600)
    workdir = tempfile.mkdtemp(prefix="pa-bench-")
    names = [f"pa-bench-{uuid.uuid4().hex[:8]}" for _ in range(args.containers)]
    agent = baseline = None
    try:
        for name in names:
            client.containers.run(BASE_IMAGE, ["sleep", "3600"], name=name, detach=True)
        agent = Agent(host, workdir)
        baseline = CliBaseline()
        report: dict[str, object] = {
            "containers": args.containers,
            "requests": args.requests,
            "latency": bench_latency(agent, baseline, names, args.requests),
        }
        if not args.skip_load:
            report["load"] = bench_load(agent, client, args.size_mib, workdir, args.rounds)
        print(json.dumps(report, indent=2))
    finally:
        if agent is not None:
            agent.stop()
        if baseline is not None:
            baseline.stop()
        for name in names:
            try:
                client.api.remove_container(name, force=True)
            except docker.errors.NotFound:
                pass
        shutil.rmtree(workdir, True)
        client.close()


if __name__ == "__main__":
    main()
