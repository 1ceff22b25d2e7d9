"""Forward-cost models fitted to the benchmarks' measurements, and what they project.

* Context length: :func:`fit_context_costs` fits a
  :class:`~mtpcode.policy.prior.ContextCosts` table (one intercept and one slope
  per row count) to forwards measured at several context lengths; the drafting
  policy's prior is such a table.
* Cores and memory bandwidth: :class:`Roofline`,
  ``T(b, P) = overhead + max(bytes / BW, compute_1core[b] / P)`` for ``P`` cores and a
  memory bandwidth ``BW``: ``compute_1core[b]`` is the one-core time of the work that
  cores share (the matrix products and unpacking of quantized blocks for ``b`` rows),
  ``overhead`` the part that does not shrink with cores, and ``bytes / BW`` the time
  to stream the weights from memory, which more cores cannot shorten.
  :func:`fit_roofline` fits it to forwards measured at 1 and 2 threads (the compute
  part, and the measuring machine's memory floor where some forwards hit it),
  :func:`project_speedup` projects speculative decoding on another machine
  (:data:`DESKTOPS`).

Pure functions on numbers (numpy for the least squares); docs/PERFORMANCE.md has
the data and the commands.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mtpcode.policy.prior import ContextCosts

# The paper's Table S2 anchor (code, 7B, 4 heads = 3 drafts per step): measured speedup
# and tokens per forward.
PAPER_SPEEDUP = 3.05
PAPER_TOKENS_PER_FORWARD = 3.50


# ---------------------------------------------------------------------------
# least squares


def _arrays(rows: Sequence[Sequence[float]], y: Sequence[float],
            weights: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, targets and weights as float arrays (weights 1 when not given)."""
    if not rows or len(rows) != len(y):
        raise ValueError("least squares needs as many targets as feature rows, and at least one")
    a = np.asarray(rows, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    w = np.ones(len(b)) if weights is None else np.asarray(weights, dtype=np.float64)
    return a, b, w


def _solve(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The weighted least-squares coefficients of ``a x = b``; ValueError when ``a`` has not full column rank."""
    root = np.sqrt(w)
    x, _, rank, _ = np.linalg.lstsq(a * root[:, None], b * root, rcond=None)
    if rank < a.shape[1]:
        raise ValueError("the measurements do not determine the model (too few distinct points)")
    return x


def least_squares(rows: Sequence[Sequence[float]], y: Sequence[float], *,
                  weights: Sequence[float] | None = None) -> list[float]:
    """Coefficients minimising sum w_i (rows_i . x - y_i)^2.

    Raises ValueError when the features do not determine the coefficients."""
    return [float(c) for c in _solve(*_arrays(rows, y, weights))]


def nonnegative_least_squares(rows: Sequence[Sequence[float]], y: Sequence[float], *,
                              weights: Sequence[float] | None = None) -> list[float]:
    """Least squares with every coefficient >= 0, by trying each subset of free coefficients.

    Meant for 2-4 coefficients (2^k subsets); a coefficient that the data would make
    negative (a cost below zero) is pinned at 0 instead."""
    if not rows:
        raise ValueError("no non-negative fit: the measurements do not determine the model")
    a, b, w = _arrays(rows, y, weights)
    k = a.shape[1]
    best: tuple[float, np.ndarray] | None = None
    for n_free in range(k, 0, -1):
        for free in itertools.combinations(range(k), n_free):
            try:
                sub = _solve(a[:, list(free)], b, w)
            except ValueError:
                continue
            if any(c < 0 for c in sub):
                continue
            x = np.zeros(k)
            x[list(free)] = sub
            err = float(np.sum(w * (a @ x - b) ** 2))
            if best is None or err < best[0] - 1e-18:
                best = (err, x)
    if best is None:
        raise ValueError("no non-negative fit: the measurements do not determine the model")
    return [float(c) for c in best[1]]


# ---------------------------------------------------------------------------
# context length


def fit_context_costs(samples: Iterable[tuple[int, int, float]], label: str = "") -> ContextCosts:
    """Fit :class:`ContextCosts` to ``(rows, n_ctx_used, seconds)`` samples.

    Each row count needs samples at two or more context lengths. Intercept and slope
    are fitted per row count, non-negative (a negative slope would be noise).
    """
    by_rows: dict[int, list[tuple[int, float]]] = {}
    for rows, n, t in samples:
        by_rows.setdefault(int(rows), []).append((int(n), float(t)))
    intercept: dict[int, float] = {}
    slope: dict[int, float] = {}
    for rows, pts in sorted(by_rows.items()):
        if len({n for n, _ in pts}) < 2:
            raise ValueError(f"{rows}-row forwards were measured at one context length; need two or more")
        c, s = nonnegative_least_squares([[1.0, float(n)] for n, _ in pts], [t for _, t in pts])
        intercept[rows], slope[rows] = c, s
    return ContextCosts(intercept, slope, label)


# ---------------------------------------------------------------------------
# cores and memory bandwidth


def interpolate(table: Mapping[int, float], x: float) -> float:
    """``table`` at ``x``: exact at its keys, linear between them, the last segment continued beyond."""
    keys = sorted(table)
    if x in table:
        return table[int(x)]
    if len(keys) == 1:
        return table[keys[0]] * x / keys[0]
    lo = max((k for k in keys if k <= x), default=keys[0])
    hi = min((k for k in keys if k > x), default=keys[-1])
    if lo == hi:
        lo, hi = (keys[0], keys[1]) if x < keys[0] else (keys[-2], keys[-1])
    return table[lo] + (x - lo) * (table[hi] - table[lo]) / (hi - lo)


@dataclass(frozen=True)
class Roofline:
    """``T(b, P) = overhead_s + max(bytes / BW, compute_1core[b] / P)`` seconds.

    ``compute_1core`` maps a row count to the one-core time of the work that more
    cores share (matrix products, unpacking quantized blocks); a table, not a line
    in ``b``, because llama.cpp's kernels work 4 or 8 rows at a time (a 4-row
    forward can cost less than a 3-row one). ``overhead_s`` is the part that does
    not shrink with cores. ``bytes_per_forward`` is the weight bytes one forward
    reads; ``head_bytes`` those of one head forward (a head costs its share of a
    1-row forward, by bytes).
    """

    compute_1core: Mapping[int, float]
    overhead_s: float
    bytes_per_forward: float
    head_bytes: float = 0.0
    label: str = ""

    def compute_s(self, rows: float, cores: float) -> float:
        return interpolate(self.compute_1core, rows) / cores

    def seconds(self, rows: float, cores: float, bandwidth_gb_s: float | None = None) -> float:
        """Modelled forward time; ``bandwidth_gb_s=None`` leaves the memory bound out (compute only)."""
        memory = self.bytes_per_forward / (bandwidth_gb_s * 1e9) if bandwidth_gb_s else 0.0
        return self.overhead_s + max(memory, self.compute_s(rows, cores))

    def head_seconds(self, cores: float, bandwidth_gb_s: float | None = None) -> float:
        if not self.bytes_per_forward:
            return 0.0
        return self.seconds(1, cores, bandwidth_gb_s) * self.head_bytes / self.bytes_per_forward

    def memory_bound_rows(self, cores: float, bandwidth_gb_s: float) -> int:
        """The most rows (of the table's) a forward takes while memory, not compute, sets its time."""
        memory = self.bytes_per_forward / (bandwidth_gb_s * 1e9)
        return max((b for b in self.compute_1core if self.compute_s(b, cores) <= memory), default=0)

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label,
                "compute_1core_s": {str(b): round(v, 6) for b, v in sorted(self.compute_1core.items())},
                "overhead_s": round(self.overhead_s, 6), "bytes_per_forward": int(self.bytes_per_forward),
                "head_bytes": int(self.head_bytes)}


@dataclass(frozen=True)
class RooflineFit:
    """A fitted :class:`Roofline`, with its residuals and what the fit could not use.

    ``memory_here_s`` is the fitted memory floor of the measuring machine (0 when none
    of its forwards was memory-bound), ``bandwidth_here_gb_s`` the read bandwidth it
    implies (None without a floor). ``dropped``: multi-thread samples slower than the
    same forward on one thread (an oversubscribed machine: llama.cpp's threads wait for
    each other at every graph node, so one descheduled thread stalls all), left out.
    ``overhead_fitted`` is False when no multi-thread sample was usable: the overhead is
    then assumed to be 0 (all work shared by the cores).
    """

    model: Roofline
    memory_here_s: float = 0.0
    residuals: list[dict[str, float]] = field(default_factory=list)
    dropped: list[dict[str, float]] = field(default_factory=list)
    overhead_fitted: bool = True

    @property
    def bandwidth_here_gb_s(self) -> float | None:
        return self.model.bytes_per_forward / self.memory_here_s / 1e9 if self.memory_here_s > 0 else None

    @property
    def max_abs_error(self) -> float:
        """Largest relative error of the fit on the samples it used."""
        return max((abs(r["rel_error"]) for r in self.residuals), default=0.0)


def _error(one: Mapping[int, float], multi: Sequence[tuple[int, int, float]], overhead: float, floor: float) -> float:
    """Sum of squared relative errors of ``T_t(b) = overhead + max(floor, (T_1(b) - overhead) / t)``."""
    return sum((overhead + max(floor, (one[b] - overhead) / t) - s) ** 2 / (s * s) for b, t, s in multi)


def fit_roofline(samples: Iterable[tuple[int, int, float]], *, bytes_per_forward: float,
                 head_bytes: float = 0.0, label: str = "", memory_floor: bool = True) -> RooflineFit:
    """Fit a :class:`Roofline` to ``(rows, threads, seconds)`` samples of one machine.

    One-thread samples give ``T_1(b) = overhead + compute_1core[b]`` for every row count
    (required). Samples at more threads ``t`` fix the split between the two and the
    machine's memory floor: ``T_t(b) = overhead + max(floor, compute_1core[b] / t)``, fitted
    by a search over (overhead, floor) that minimises the squared relative error
    (``memory_floor=False`` fixes the floor at 0). Several samples of one cell are
    averaged first.
    """
    cells: dict[tuple[int, int], list[float]] = {}
    for b, t, s in samples:
        if s <= 0:
            raise ValueError("forward times must be positive")
        cells.setdefault((int(b), int(t)), []).append(float(s))
    pts = [(b, t, sum(v) / len(v)) for (b, t), v in sorted(cells.items())]
    one = {b: s for b, t, s in pts if t == 1}
    if not one:
        raise ValueError("fitting cores needs forwards measured with one thread")
    if any(t > 1 and b not in one for b, t, _ in pts):
        raise ValueError("every row count measured with several threads needs its one-thread time too")
    multi = [(b, t, s) for b, t, s in pts if t > 1 and s < one[b]]
    dropped = [{"rows": b, "threads": t, "measured_s": round(s, 6), "one_thread_s": round(one[b], 6)}
               for b, t, s in pts if t > 1 and s >= one[b]]
    overhead = floor = 0.0
    if multi:
        best = (_error(one, multi, 0.0, 0.0), 0.0, 0.0)
        top_o = min(one.values())
        floors = [0.0] + ([min(s for _, _, s in multi) * i / 100 for i in range(1, 101)] if memory_floor else [])
        for i in range(200):  # coarse grid, then a finer one around the best overhead
            o = top_o * i / 200
            for f in floors:
                err = _error(one, multi, o, f)
                if err < best[0]:
                    best = (err, o, f)
        step_o = top_o / 200
        step_f = floors[1] if len(floors) > 1 else 0.0
        for _ in range(3):  # finer grids around the best point
            _, o0, f0 = best
            for i in range(-10, 11):
                o = min(max(0.0, o0 + step_o * i / 10), top_o * 0.999)
                for j in range(-10, 11) if step_f else (0,):
                    f = max(0.0, f0 + step_f * j / 10) if f0 or j > 0 else 0.0
                    err = _error(one, multi, o, f)
                    if err < best[0]:
                        best = (err, o, f)
            step_o, step_f = step_o / 10, step_f / 10
        _, overhead, floor = best
    compute = {b: s - overhead for b, s in one.items()}
    if floor and all(compute[b] / t >= floor for b, t, _ in multi):
        floor = 0.0  # a floor below every compute time changes nothing: report none
    model = Roofline(compute_1core=compute, overhead_s=overhead, bytes_per_forward=bytes_per_forward,
                     head_bytes=head_bytes, label=label)
    residuals = []
    for b, t, s in pts:
        if t > 1 and s >= one[b]:
            continue
        pred = overhead + max(floor, model.compute_s(b, t))
        residuals.append({"rows": b, "threads": t, "measured_s": round(s, 6), "model_s": round(pred, 6),
                          "rel_error": round(pred / s - 1.0, 4)})
    return RooflineFit(model, floor, residuals, dropped, overhead_fitted=bool(multi))


def geometric_acceptance(tokens_per_forward: float, n_drafts: int) -> float:
    """The per-draft acceptance ``a`` with ``1 + a + ... + a^n = tokens_per_forward`` (an
    assumption: each further draft is accepted with the same conditional probability)."""
    lo, hi = 0.0, 1.0
    target = min(tokens_per_forward, n_drafts + 1.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(n_drafts + 1)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Machine:
    """A target machine for a projection: cores used by llama.cpp and achievable read bandwidth."""

    name: str
    cores: int
    bandwidth_gb_s: float
    note: str = ""


# Desktop targets for the projections (assumptions, stated in docs/PERFORMANCE.md): both
# with two channels of DDR5, of which llama.cpp reads about 60 GB/s; cores as fast as the
# measuring machine's (a desktop core at 5 GHz is faster, which would make verifying cheaper).
DESKTOPS = (
    Machine("8-core desktop", 8, 60.0, "e.g. Ryzen 7 7700 / Core i7 class, 2 x DDR5"),
    Machine("16-core desktop", 16, 60.0, "e.g. Ryzen 9 7950X class, 2 x DDR5"),
)


def project_speedup(model: Roofline, cores: int, bandwidth_gb_s: float | None, *,
                    tokens_per_forward: float = PAPER_TOKENS_PER_FORWARD, n_drafts: int = 3) -> dict[str, object]:
    """PROJECTED speedup of self-speculative decoding over plain decoding on ``cores`` cores
    with ``bandwidth_gb_s`` of memory bandwidth (None: compute only).

    Plain: one 1-row forward per token. With ``k`` drafts: one (k+1)-row forward plus
    ``k`` head forwards per step, yielding ``1 + a + ... + a^k`` tokens, ``a`` the
    geometric per-draft acceptance that gives ``tokens_per_forward`` at ``n_drafts``.
    Python overhead per step is not included.
    """
    a = geometric_acceptance(tokens_per_forward, n_drafts)
    one = model.seconds(1, cores, bandwidth_gb_s)
    head = model.head_seconds(cores, bandwidth_gb_s)
    per_k = []
    for k in range(n_drafts + 1):
        tpf = sum(a ** i for i in range(k + 1))
        step = model.seconds(k + 1, cores, bandwidth_gb_s) + k * head
        per_k.append({"drafts": k, "tokens_per_forward": round(tpf, 3), "step_cost_rel": round(step / one, 3),
                      "speedup": round(tpf * one / step, 3)})
    best = max(per_k, key=lambda r: float(r["speedup"]))
    return {
        "label": "PROJECTION (fitted cost model x assumed acceptance), not a measured speedup",
        "cores": cores,
        "bandwidth_gb_s": bandwidth_gb_s,
        "one_row_ms": round(1e3 * one, 2),
        "plain_tokens_per_s": round(1.0 / one, 2) if one > 0 else None,
        "memory_bound_rows": round(model.memory_bound_rows(cores, bandwidth_gb_s), 2) if bandwidth_gb_s else 0.0,
        "per_draft_acceptance": round(a, 4),
        "per_k": per_k,
        "at_n": per_k[n_drafts],
        "best": best,
    }
