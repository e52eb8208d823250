"""The default run's wall time by torch thread count, on an idle machine and beside one busy process.

Why ``trainer.threads`` defaults to ``min(4, cores // 2)``: a small model gains little from a thread
per core, and when another process keeps a core busy, torch's threads wait on each other (the
default run took 375-428 s instead of 15 s on a loaded 2-core machine). One run prints every figure
and its ratio to the default setting's idle time, so a noisy machine still gives comparable numbers.

    .venv/bin/python benchmarks/threads_under_load.py [--threads 1,2] [--limit 300] [overrides ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metagate.schema import default_threads

BUSY = "while True: pass"


def timed_run(threads: int, overrides: list[str], limit: float) -> float | None:
    """Seconds for ``metagate run`` (the default experiment) with ``threads``; None past ``limit``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(Path(sys.executable).parent / "metagate"), "run", f"trainer.threads={threads}", "trainer.progress=false",
               *overrides, "--out", str(Path(tmp) / "run")]
        start = time.perf_counter()
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return None
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default: the default setting and the core count)")
    p.add_argument("--limit", type=float, default=300.0, help="seconds before a run is stopped and reported as over the limit")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({default_threads(), cores})
    print(f"cores {cores}; default threads {default_threads()}; command: metagate run trainer.threads=N {' '.join(args.overrides)}")
    rows = []
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            for n in counts:
                rows.append((busy, n, timed_run(n, args.overrides, args.limit)))
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    base = next(s for busy, n, s in rows if not busy and n == default_threads()) if default_threads() in counts else None
    print("| other process | threads | wall time (s) | / default idle |")
    print("|---|---|---|---|")
    for busy, n, secs in rows:
        shown = f"> {args.limit:.0f}" if secs is None else f"{secs:.1f}"
        ratio = "n/a" if secs is None or not base else f"{secs / base:.2f}"
        print(f"| {'one busy' if busy else 'none'} | {n}{' (default)' if n == default_threads() else ''} | {shown} | {ratio} |")


if __name__ == "__main__":
    main()
