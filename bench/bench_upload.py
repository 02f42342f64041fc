"""
Benchmark: streaming a large .tar.gz through POST /upload/tar/stream of a
real agent (twistd) against ``tar xzf`` of the same file, in the same run,
and the agent's peak RSS (VmHWM) while doing it.

    python bench/bench_upload.py [--size-mib 1024] [--workdir DIR] [--keep]

Targets (issue 6): throughput >= 70% of tar xzf, agent peak RSS < 150 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "bench-api-key"
RUN_DIRS: list[str] = []


def make_archive(path: str, size_mib: int, scratch: str) -> None:
    """
    A .tar.gz of about ``size_mib`` MiB: mostly incompressible 4 MiB files
    (media, packed assets), some compressible text and many small files,
    like a deployable site bundle.
    """
    src = os.path.join(scratch, "src")
    os.makedirs(src)
    block = 4 << 20
    text = (b"".join(b"line %d: the quick brown fox jumps over the lazy dog %x\n" % (i, i * 7919) for i in range(80000)))[:block]
    written = 0
    n = 0
    while written < size_mib << 20:
        d = os.path.join(src, f"d{n // 50:03d}")
        os.makedirs(d, exist_ok=True)
        if n % 5 == 4:
            with open(os.path.join(d, f"text{n}.log"), "wb") as f:
                f.write(text)
            written += block // 4  # compresses about 4:1
        else:
            with open(os.path.join(d, f"blob{n}.bin"), "wb") as f:
                f.write(os.urandom(block))
            written += block
        n += 1
    small = os.path.join(src, "small")
    os.makedirs(small)
    for i in range(5000):
        with open(os.path.join(small, f"f{i}.txt"), "wb") as f:
            f.write(b"small file %d\n" % i * 20)
    subprocess.run(["tar", "czf", path, "-C", src, "."], check=True)
    shutil.rmtree(src)


def run_tar(archive: str, target: str) -> float:
    os.makedirs(target)
    start = time.perf_counter()
    subprocess.run(["tar", "xzf", archive, "-C", target], check=True)
    return time.perf_counter() - start


def start_agent(workdir: str, root: str) -> tuple[subprocess.Popen, int]:
    data_dir = os.path.join(workdir, "data")
    os.makedirs(data_dir, exist_ok=True)
    # A short directory for the socket (AF_UNIX paths are limited to 108 bytes).
    run_dir = tempfile.mkdtemp(prefix="plexagent-bench-")
    RUN_DIRS.append(run_dir)
    key_file = os.path.join(workdir, "api-key")
    with open(key_file, "w") as f:
        f.write(API_KEY)
    os.chmod(key_file, 0o600)
    config = os.path.join(workdir, "plexagent.toml")
    with open(config, "w") as f:
        f.write(f"""
[node]
data_dir = {json.dumps(data_dir)}
[node_api]
socket = {json.dumps(os.path.join(run_dir, "api.sock"))}
[agent_api]
listen = "127.0.0.1:0"
api_key_file = {json.dumps(key_file)}
allowed_paths = [{json.dumps(root + "/")}]
""")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "plexagent",
         "--config", config],
        cwd=HERE, env=dict(os.environ, PYTHONPATH=HERE), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    pattern = re.compile(rb"agent_api\.listen listening on .*?port=(\d+)")
    assert proc.stdout is not None
    for line in proc.stdout:
        m = pattern.search(line)
        if m:
            return proc, int(m.group(1))
    raise SystemExit("agent did not start")


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_agent(archive: str, port: int, target: str) -> tuple[float, dict]:
    url = f"http://127.0.0.1:{port}/upload/tar/stream?extract_path={target}"
    start = time.perf_counter()
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", "-H", f"X-API-Key: {API_KEY}", "-H", "Content-Type: application/gzip",
         "-H", "Expect:", "--data-binary", f"@{archive}", url],
        check=True, capture_output=True,
    )
    elapsed = time.perf_counter() - start
    return elapsed, json.loads(out.stdout)


def emit_tar(total: int, member_size: int = 256 << 20) -> None:
    """Write a generated tar of ``total`` bytes of zeros (in members) to stdout."""
    import tarfile

    out = sys.stdout.buffer
    zeros = bytes(1 << 20)
    written = 0
    n = 0
    while written < total:
        size = min(member_size, total - written)
        info = tarfile.TarInfo(f"gen/part{n:04d}.bin")
        info.size = size
        out.write(info.tobuf(format=tarfile.GNU_FORMAT))
        left = size
        while left:
            piece = zeros[: min(left, len(zeros))]
            out.write(piece)
            left -= len(piece)
        out.write(bytes((512 - size % 512) % 512))
        written += size
        n += 1
    out.write(bytes(1024))
    out.flush()


def run_generated(gib: int, workdir: str, root: str) -> None:
    """Stream a generated multi-GiB .tar.gz (chunked, never on disk) and report peak RSS."""
    proc, port = start_agent(workdir, root)
    target = os.path.join(root, "generated")
    try:
        start = time.perf_counter()
        pipeline = (
            f"{sys.executable} {os.path.abspath(__file__)} --emit-tar {gib << 30} | gzip -1 | "
            f"curl -sS -X POST -T - -H 'X-API-Key: {API_KEY}' -H 'Content-Type: application/gzip' "
            f"'http://127.0.0.1:{port}/upload/tar/stream?extract_path={target}'"
        )
        out = subprocess.run(["sh", "-c", pipeline], check=True, capture_output=True)
        elapsed = time.perf_counter() - start
        body = json.loads(out.stdout)
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(target, ignore_errors=True)
    print(f"generated stream: {body['bytes'] / (1 << 30):.1f} GiB extracted in {elapsed:.1f} s "
          f"({body['bytes'] / (1 << 20) / elapsed:.0f} MiB/s); agent peak RSS {rss:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024, help="approximate compressed size")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--generated-gib", type=int, default=0,
                        help="instead: stream a generated tar.gz of this many GiB (memory check)")
    parser.add_argument("--emit-tar", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emit_tar:
        emit_tar(args.emit_tar)
        return
    if args.generated_gib:
        workdir = os.path.realpath(args.workdir or tempfile.mkdtemp(prefix="bench-upload-"))
        root = os.path.join(workdir, "root")
        os.makedirs(root, exist_ok=True)
        run_generated(args.generated_gib, workdir, root)
        if args.workdir is None:
            shutil.rmtree(workdir)
        return
    workdir = os.path.realpath(args.workdir or tempfile.mkdtemp(prefix="bench-upload-"))
    os.makedirs(workdir, exist_ok=True)
    archive = os.path.join(workdir, "bundle.tar.gz")
    root = os.path.join(workdir, "root")
    os.makedirs(root, exist_ok=True)
    if not os.path.exists(archive):
        print(f"building a ~{args.size_mib} MiB .tar.gz ...", flush=True)
        make_archive(archive, args.size_mib, workdir)
    size = os.path.getsize(archive)
    # Warm the page cache the same way for both.
    subprocess.run(["cat", archive], stdout=subprocess.DEVNULL, check=True)

    proc, port = start_agent(workdir, root)
    try:
        baseline_rss = peak_rss_mib(proc.pid)
        results = []
        for attempt in range(2):
            tar_dir = os.path.join(root, f"tar{attempt}")
            agent_dir = os.path.join(root, f"agent{attempt}")
            tar_s = run_tar(archive, tar_dir)
            agent_s, body = run_agent(archive, port, agent_dir)
            assert body.get("success"), body
            results.append((tar_s, agent_s, body))
            shutil.rmtree(tar_dir)
            shutil.rmtree(agent_dir)
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    tar_s = min(r[0] for r in results)
    agent_s = min(r[1] for r in results)
    body = results[-1][2]
    mib = size / (1 << 20)
    print(f"archive: {mib:.0f} MiB compressed, {body['bytes'] / (1 << 20):.0f} MiB extracted, "
          f"{body['files']} files")
    print(f"tar xzf:            {tar_s:6.2f} s  {mib / tar_s:7.1f} MiB/s (compressed)")
    print(f"/upload/tar/stream: {agent_s:6.2f} s  {mib / agent_s:7.1f} MiB/s (compressed)")
    print(f"throughput ratio:   {tar_s / agent_s * 100:.0f}% of tar xzf (target >= 70%)")
    print(f"agent peak RSS:     {rss:.0f} MiB (VmHWM; {baseline_rss:.0f} MiB after startup; target < 150 MiB)")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    try:
        main()
    finally:
        for run_dir in RUN_DIRS:
            shutil.rmtree(run_dir, ignore_errors=True)
