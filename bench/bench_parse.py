"""
The strict JSON parser on hostile shapes: its time must grow linearly with
the body, and stay within a small factor of ``json.loads`` on an ordinary
document of the same size (the baseline, measured in the same run).

    python bench/bench_parse.py [--repeat 3]

For each shape and size it prints the best time of ``--repeat`` runs, the
ratio to the baseline of that size, and the growth from one size to the
next (a linear parser grows about 4x when the body does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plexagent import errors  # noqa: E402
from plexagent.strictparse import parse_json  # noqa: E402

SIZES = (256 << 10, 1 << 20, 4 << 20, 16 << 20)


def shapes(size: int) -> dict[str, bytes]:
    return {
        # An unterminated string of escaped quotes behind deep brackets.
        "deep + unterminated \\\"": b"[" * 65 + b'"' + b'\\"' * ((size - 66) // 2),
        "many empty arrays": b"[" + b"[]," * (size // 3) + b"[]]",
        "many escaped strings": b"[" + b'"\\"[[[",' * (size // 9) + b"1]",
        "many numbers": b"[" + b"1," * (size // 2) + b"1]",
        "file content": json.dumps({"path": "/tmp/x", "content": "line, [one] {two}\n\"q\"\n" * (size // 26)}).encode(),
    }


def baseline(size: int) -> bytes:
    """An ordinary document: a file's content as /files/write takes it."""
    return json.dumps({"path": "/app/config.js", "content": "x" * size}).encode()


def best(fn: object, data: bytes, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            fn(data)  # type: ignore[operator]
        except (errors.InvalidInput, ValueError):
            pass
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    def strict(data: bytes) -> object:
        return parse_json(data, max_bytes=1 << 30)

    print(f"{'shape':24} {'size':>6} {'strict':>9} {'x baseline':>10} {'growth':>7}")
    previous: dict[str, float] = {}
    for size in SIZES:
        base = best(json.loads, baseline(size), args.repeat)
        print(f"{'baseline json.loads':24} {size >> 10:5}K {base * 1000:8.1f}ms {1.0:10.1f}")
        for name, data in shapes(size).items():
            took = best(strict, data, args.repeat)
            growth = f"{took / previous[name]:6.1f}x" if name in previous else ""
            previous[name] = took
            print(f"{name:24} {size >> 10:5}K {took * 1000:8.1f}ms {took / base:10.1f} {growth:>7}")


if __name__ == "__main__":
    main()
