"""Measurement helpers shared by the benchmarks: the median of a sample, how long two token
sequences agree, the process's memory marks and the CPU's name."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def median(xs: Sequence[float]) -> float:
    """Median of ``xs`` as a float; 0.0 for an empty sample (a configuration that produced no runs)."""
    return float(np.median(np.asarray(xs, dtype=np.float64))) if len(xs) else 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` share from their start (the index of the first difference,
    or the shorter length when one is a prefix of the other)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _status_kb(key: str) -> float | None:
    """A ``kB`` field of /proc/self/status (Linux), or None where the file or the field is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size in MiB; 0.0 where /proc is unavailable."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else 0.0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size in MiB since start or the last :func:`reset_peak_rss`.

    VmHWM where /proc has it (it can be reset); otherwise getrusage's lifetime maximum
    (kilobytes on Linux)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for every result file: figures must name the CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
