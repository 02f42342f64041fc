"""
A small HTTP/1.1 keep-alive load generator (asyncio, stdlib only) for Unix
sockets and TCP: N concurrent clients, each sending requests back to back
for a fixed time. Reports requests/s and latency percentiles.

It runs in its own process (pinned to its own CPU when possible) so it does
not share the server's interpreter.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(round(p / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _client(target: dict[str, Any], request: bytes, deadline: float, latencies: list[float],
                  errors: list[int]) -> None:
    if target.get("unix"):
        reader, writer = await asyncio.open_unix_connection(target["unix"])
    else:
        reader, writer = await asyncio.open_connection(target["host"], target["port"])
    try:
        while True:
            start = time.perf_counter()
            if start >= deadline:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
                    break
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if status >= 400:
                errors.append(status)
    finally:
        writer.close()


def build_request(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("PUT", "POST"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run(target: dict[str, Any], method: str, path: str, headers: dict[str, str], body: bytes,
              concurrency: int, seconds: float, warmup: float = 0.5) -> dict[str, Any]:
    request = build_request(method, path, headers, body)
    # Warm up (connections, caches), then measure.
    await asyncio.gather(*[_client(target, request, time.perf_counter() + warmup, [], [])
                           for _ in range(concurrency)])
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    await asyncio.gather(*[_client(target, request, start + seconds, latencies, errors)
                           for _ in range(concurrency)])
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "errors": len(errors),
        "error_codes": sorted(set(errors)),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        import os

        os.sched_setaffinity(0, {spec.get("cpu", 1)})
    except (AttributeError, OSError):
        pass
    result = asyncio.run(
        run(spec["target"], spec["method"], spec["path"], spec.get("headers", {}),
            spec.get("body", "").encode(), spec["concurrency"], spec["seconds"])
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
