"""
Local Node API throughput and latency, beside two baselines measured in the
same run, on the same transport, serving the same bytes:

- ``bare``:  a bare twisted.web leaf resource;
- ``klein``: a one-route Klein app (the framework's floor);
- ``agent``: the real daemon (``twistd plexagent``) with a durable report store.

Each server runs in its own process pinned to CPU 0; the load generator
(bench/loadgen.py) runs pinned to CPU 1. Usage:

    python bench/bench_nodeapi.py [--seconds 3] [--readers 32] [--writers 16]

Prints a Markdown table (paste it into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from common import free_port, rss_mib  # noqa: E402

from plexagent.testing.fixtures import AgentSandbox  # noqa: E402

STATE = {
    "metadata": {"node_id": "edge-us-west-42", "region": "us-west-2", "role": "gateway"},
    "data": [
        {"key": "nginx.conf", "content_type": "text/plain", "payload": "server {}", "version": 3,
         "updated_at": "2025-06-01T12:00:00Z"},
        {"key": "routes.json", "content_type": "application/json", "payload": {"default_backend": "10.0.0.5:8080"},
         "version": 1, "updated_at": "2025-06-01T12:34:56Z"},
    ],
    "secret_refs": [{"key": "db/password", "version": 2}, {"key": "tls/server.key", "version": 1}],
}
PUT_BODY = json.dumps({"content_type": "application/json", "payload": {"status": "healthy", "uptime_s": 86400}})

ROUTES = [
    ("GET /v1/state/metadata/{key}", "GET", "/v1/state/metadata/region", ""),
    ("GET /v1/state", "GET", "/v1/state", ""),
    ("GET /v1/state/report/{key}", "GET", "/v1/state/report/health", ""),
    ("PUT /v1/state/report/{key}", "PUT", "/v1/state/report/health", PUT_BODY),
]

BASELINE_SERVER = r"""
import json, os, sys
os.sched_setaffinity(0, {0})
from twisted.internet import reactor
from twisted.web import resource, server

kind, sock, port, bodies = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
bodies = {k.encode(): v.encode() for k, v in bodies.items()}

def answer(request):
    body = bodies[request.method + b" " + request.path]
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body

if kind == "bare":
    class Leaf(resource.Resource):
        isLeaf = True
        def render(self, request):
            return answer(request)
    root = Leaf()
else:
    from klein import Klein
    app = Klein()
    # One route, whatever the path: the framework's per-request floor.
    @app.route("/<path:rest>", methods=["GET", "PUT"])
    def one(request, rest):
        return answer(request)
    root = app.resource()

site = server.Site(root)
site.log = lambda request: None
reactor.listenUNIX(sock, site)
reactor.listenTCP(port, site, interface="127.0.0.1")
print("ready", flush=True)
reactor.run()
"""


def wait_ready(sock: str, port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early: {proc.returncode}")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.close()
            t = socket.create_connection(("127.0.0.1", port), timeout=1)
            t.close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server never became ready")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_request(sock: str, method: str, path: str, headers: dict[str, str], body: str) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    s.sendall(head.encode() + body.encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data.partition(b"\r\n\r\n")[2]


def start_agent(workdir: str) -> tuple[subprocess.Popen, AgentSandbox, int]:
    sandbox = AgentSandbox(base=workdir)
    port = free_port()
    sandbox.enable_http(f"127.0.0.1:{port}")
    os.makedirs(sandbox.data_dir, mode=0o700)
    with open(os.path.join(sandbox.data_dir, "state.json"), "w") as f:
        json.dump(STATE, f)
    config = sandbox.write()
    env = dict(os.environ, PYTHONPATH=ROOT)
    code = "import os; os.sched_setaffinity(0, {0}); from twisted.scripts.twistd import run; run()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "-n", "--pidfile=", "--logfile=-", "plexagent", "--config", config],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    wait_ready(sandbox.socket, port, proc)
    return proc, sandbox, port


def start_baseline(kind: str, workdir: str, bodies: dict[str, str]) -> tuple[subprocess.Popen, str, int]:
    sock = os.path.join(workdir, f"{kind}.sock")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, kind, sock, str(port), json.dumps(bodies)],
                            stdout=subprocess.DEVNULL)
    wait_ready(sock, port, proc)
    return proc, sock, port


def load(target: dict[str, Any], method: str, path: str, headers: dict[str, str], body: str,
         concurrency: int, seconds: float) -> dict[str, Any]:
    spec = {"target": target, "method": method, "path": path, "headers": headers, "body": body,
            "concurrency": concurrency, "seconds": seconds, "cpu": 1}
    out = subprocess.run([sys.executable, os.path.join(HERE, "loadgen.py"), json.dumps(spec)],
                         capture_output=True, check=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--readers", type=int, default=32)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--only", default="", help="measure only routes whose label contains this text")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds per measurement, servers interleaved; the median round is reported")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="pa-bench-", dir="/tmp")
    procs: list[subprocess.Popen] = []
    try:
        agent, sandbox, agent_port = start_agent(workdir)
        procs.append(agent)
        time.sleep(1.0)
        idle_rss = rss_mib(agent.pid)
        auth = {"Authorization": f"Bearer {sandbox.http_token}"}
        raw_request(sandbox.socket, "PUT", "/v1/state/report/health", {}, PUT_BODY)
        bodies = {}
        for _, method, path, body in ROUTES:
            bodies[f"{method} {path}"] = raw_request(sandbox.socket, method, path, {}, body).decode()
        servers = {"agent": ({"unix": sandbox.socket}, {"host": "127.0.0.1", "port": agent_port})}
        pids = {"agent": agent.pid}
        for kind in ("bare", "klein"):
            proc, sock, port = start_baseline(kind, workdir, bodies)
            procs.append(proc)
            servers[kind] = ({"unix": sock}, {"host": "127.0.0.1", "port": port})
            pids[kind] = proc.pid

        rows = []
        for label, method, path, body in ROUTES:
            if args.only not in label:
                continue
            concurrency = args.writers if method == "PUT" else args.readers
            for t_index, transport in enumerate(("unix", "tcp")):
                rounds: dict[str, list[dict[str, Any]]] = {"bare": [], "klein": [], "agent": []}
                for _ in range(args.repeat):
                    for kind in ("bare", "klein", "agent"):
                        headers = auth if transport == "tcp" else {}
                        before = cpu_seconds(pids[kind])
                        result = load(servers[kind][t_index], method, path, headers, body, concurrency,
                                      args.seconds)
                        # Includes the warm-up: CPU per request over all requests served.
                        result["cpu_us"] = (cpu_seconds(pids[kind]) - before) * 1e6 / max(
                            1, result["requests"] * (1 + 0.5 / args.seconds))
                        if result["errors"]:
                            raise SystemExit(f"{kind} {label} {transport}: errors {result['error_codes']}")
                        rounds[kind].append(result)
                results = {kind: sorted(r, key=lambda x: x["rps"])[len(r) // 2] for kind, r in rounds.items()}
                rows.append((label, transport, concurrency, results))
        peak_rss = rss_mib(agent.pid)

        print("| route | transport | clients | bare rps | klein rps | agent rps | agent p50 ms | agent p99 ms "
              "| agent / klein rps | klein / bare rps | CPU µs/req bare / klein / agent | agent / klein by CPU |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for label, transport, concurrency, r in rows:
            print(f"| {label} | {transport} | {concurrency} | {r['bare']['rps']:.0f} | {r['klein']['rps']:.0f} "
                  f"| {r['agent']['rps']:.0f} | {r['agent']['p50_ms']:.2f} | {r['agent']['p99_ms']:.2f} "
                  f"| {r['agent']['rps'] / r['klein']['rps']:.0%} | {r['klein']['rps'] / r['bare']['rps']:.0%} "
                  f"| {r['bare']['cpu_us']:.0f} / {r['klein']['cpu_us']:.0f} / {r['agent']['cpu_us']:.0f} "
                  f"| {r['klein']['cpu_us'] / r['agent']['cpu_us']:.0%} |")
        print()
        print(f"agent RSS: idle {idle_rss:.1f} MiB, after the run {peak_rss:.1f} MiB")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
