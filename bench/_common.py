"""Helpers every Quiver benchmark shares: arguments, timing, percentiles, the JSON line.

    args = bench_args("what this measures")          # --quick, --json, --repeat
    with Timer() as t: work()
    p50 = percentile(samples, 50)
    report(args, {"pull_vs_raw": 1.02, ...}, lines)   # prints lines, then one JSON object last

Each benchmark measures Quiver and its peer in the same run and reports ratios; absolute
figures depend on the machine, which :func:`machine` describes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable

__all__ = ["bench_args", "Timer", "timed", "percentile", "summarize", "machine", "report",
           "rss_bytes", "ratio"]


def bench_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``--quick``, ``--json`` and ``--repeat N`` (plus what ``extra`` adds)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--repeat", type=int, default=None, help="repetitions per measurement")
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def timed(fn: Callable[[], Any], repeat: int = 1, setup: Callable[[], Any] | None = None
          ) -> list[float]:
    """Seconds per call of ``fn`` over ``repeat`` calls (``setup`` runs untimed before each)."""
    out = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def percentile(samples: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("no samples")
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50": percentile(samples, 50), "p90": percentile(samples, 90),
            "p99": percentile(samples, 99), "mean": statistics.fmean(samples),
            "min": min(samples), "max": max(samples)}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("inf")


def machine() -> dict[str, Any]:
    """A short description of the machine the figures come from."""
    gpu = None
    torch = sys.modules.get("torch")   # only when the benchmark imported it already
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = round(int(fh.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "gpu": gpu,
            "python": platform.python_version(), "os": platform.platform(terse=True)}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def report(args: argparse.Namespace, result: dict[str, Any], lines: list[str] = ()) -> None:
    """Print the human lines, then (with ``--json``) the result as the last stdout line."""
    for line in lines:
        print(line)
    if args.json:
        print(json.dumps({**result, "machine": machine(), "quick": bool(args.quick)},
                         default=str))


def prefault_page_cache(folder: str | os.PathLike[str], mb: int) -> float:
    """Write ``mb`` MiB to a file in ``folder`` and delete it; return the seconds it took.

    On a VM, the first time the guest touches a page costs far more than reusing a freed one
    (2-3 ms per MB against 0.25 here), so a transfer that keeps its file would otherwise pay a
    cost that one which deletes, or runs later, does not. A VM that reports free pages to its
    host (virtio-balloon) loses the refill within seconds, so call this right before each timed
    transfer there.
    """
    path = os.path.join(folder, f".prefault-{os.getpid()}")
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(mb):
            os.write(fd, block)
    finally:
        os.close(fd)
        os.unlink(path)
    return time.perf_counter() - t0
