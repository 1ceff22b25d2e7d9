"""The drafting policy's prior on what a forward costs before it has measured any.

:class:`ContextCosts` is the time of a forward of ``b`` rows after ``n`` tokens of KV
cache, ``T(b, n) = W[b] + n * A[b]``: one intercept and one slope per row count. The
intercept is the weights' part (matrix products, norms, graph overhead), the slope
the attention over the cache. One pair per row count, not a formula in ``b``,
because llama.cpp's kernels work 4 or 8 rows at a time, which makes some batch
sizes nearly free and others not. :func:`verify_cost_prior` reads the built-in
model's measured table. Pure functions on numbers: the policy imports this on every
engine start. The benchmarks fit such tables (``mtpcode.bench.costmodel``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ContextCosts:
    """``T(b, n) = intercept[b] + n * slope[b]`` seconds for ``b`` rows after ``n`` cached tokens.

    ``intercept`` and ``slope`` map row counts (1 and up) to seconds and seconds
    per cached token. A row count between or beyond the measured ones is
    interpolated or extrapolated linearly from its neighbours.
    """

    intercept: Mapping[int, float]
    slope: Mapping[int, float]
    label: str = ""

    def __post_init__(self) -> None:
        if 1 not in self.intercept or set(self.intercept) != set(self.slope):
            raise ValueError("context costs need the same row counts in intercept and slope, including 1")

    def _at(self, table: Mapping[int, float], rows: float) -> float:
        keys = sorted(table)
        if rows in table:
            return table[int(rows)]
        if len(keys) == 1:
            return table[keys[0]] * rows
        lo = max((k for k in keys if k <= rows), default=keys[0])
        hi = min((k for k in keys if k > rows), default=keys[-1])
        if lo == hi:  # beyond the table: continue the last segment
            lo, hi = keys[-2], keys[-1]
        return table[lo] + (rows - lo) * (table[hi] - table[lo]) / (hi - lo)

    def seconds(self, rows: float, n_ctx_used: float) -> float:
        """Modelled time of a forward of ``rows`` rows after ``n_ctx_used`` cached tokens."""
        return self._at(self.intercept, rows) + max(0.0, n_ctx_used) * self._at(self.slope, rows)

    def relative(self, rows: float, n_ctx_used: float) -> float:
        """``T(rows, n) / T(1, n)``: the cost of the forward in 1-row forwards at the same context."""
        one = self.seconds(1, n_ctx_used)
        return self.seconds(rows, n_ctx_used) / one if one > 0 else float(rows)

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label,
                "intercept_s": {str(b): round(v, 9) for b, v in sorted(self.intercept.items())},
                "slope_s_per_token": {str(b): round(v, 12) for b, v in sorted(self.slope.items())}}


# Prior for the drafting policy: the built-in model (mtpcode/builtin, F32, 1 thread as
# the runtime runs models under 50 M parameters), measured on a 2-vCPU AMD EPYC with
# ``python -m mtpcode.bench.synthetic --contexts`` (docs/results/costs-context-builtin.json,
# docs/PERFORMANCE.md "Costs at the context lengths users have"). Times in seconds.
BUILTIN_FLASH_OFF = ContextCosts(
    intercept={1: 0.000847, 2: 0.00204, 3: 0.00241, 4: 0.00236, 5: 0.00258, 6: 0.00282, 7: 0.0031, 8: 0.00325},
    slope={1: 6.72e-07, 2: 1.84e-06, 3: 1.87e-06, 4: 2.11e-06, 5: 2.48e-06, 6: 2.43e-06, 7: 2.57e-06, 8: 2.66e-06},
    label="built-in model, flash attention off, 1 thread",
)
BUILTIN_FLASH_ON = ContextCosts(
    intercept={1: 0.000829, 2: 0.00156, 3: 0.00134, 4: 0.00168, 5: 0.00204, 6: 0.00211, 7: 0.00269, 8: 0.00252},
    slope={1: 7.22e-07, 2: 3.34e-06, 3: 4.91e-06, 4: 5.04e-06, 5: 5.03e-06, 6: 5.75e-06, 7: 6.37e-06, 8: 7.26e-06},
    label="built-in model, flash attention on, 1 thread",
)


def verify_cost_prior(rows: int, n_ctx_used: int, *, flash_attn: bool = False) -> float:
    """Prior cost of a ``rows``-row forward after ``n_ctx_used`` cached tokens, in units of
    one 1-row forward at the same context (1.0 for one row).

    From the built-in model's measured cost table (see :data:`BUILTIN_FLASH_OFF`); a
    policy should replace it with its own measurements as they come in. With flash
    attention on, every row walks the whole cache again, so long contexts make
    verifying expensive; with it off the rows share one pass over K and V.
    """
    if rows < 1:
        raise ValueError(f"a forward has at least one row, not {rows}")
    return (BUILTIN_FLASH_ON if flash_attn else BUILTIN_FLASH_OFF).relative(rows, n_ctx_used)
