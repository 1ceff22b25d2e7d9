"""What a step costs: a main forward of ``rows`` rows, the graph rebuild a verify causes, a head forward.

:class:`MeasuredCosts` learns the times as decoding goes (running means per
row count), and takes the shape of a measured CPU table (:mod:`mtpcode.policy.prior`)
for sizes it has not seen. :class:`FixedCosts` is a fixed model in units of a
one-row forward, for seeded sampling: with measured times the number of
drafts, hence the random draws, would depend on machine noise, and the same
seed would not give the same text.
"""

from __future__ import annotations

from typing import Any

from mtpcode.policy.prior import verify_cost_prior

# Weight of a new observation in the running means (the same for acceptance estimates).
ALPHA = 0.1
# The cost table is rebuilt when the context grows by this many tokens (verify costs grow with it).
CONTEXT_STEP = 256
# ... or when a measured time moved by more than this fraction.
TABLE_TOLERANCE = 0.02
# A saved time at or above this many seconds is not a forward's: such a state is refused.
MAX_SAVED_SECONDS = 60.0
# The fixed model, in one-row forwards: a forward of b rows costs FIXED_BASE + FIXED_PER_ROW * b
# (one row: 1.0; the built-in model on a CPU measures about this), a head forward FIXED_HEAD
# (a head is one block of many: a few percent of a forward).
FIXED_BASE = 0.7
FIXED_PER_ROW = 0.3
FIXED_HEAD = 0.05


class FixedCosts:
    """The fixed cost model: the same plans for the same outcomes, whatever the machine does."""

    measured = False

    def at(self, n_cached: int) -> None:
        """The context length of the step about to be planned (the fixed model ignores it)."""

    @property
    def ready(self) -> bool:
        return True

    def verify(self, rows: int) -> float:
        return FIXED_BASE + FIXED_PER_ROW * rows

    def head(self) -> float:
        return FIXED_HEAD

    def measured_rows(self, rows: int) -> bool:
        return True

    def step_cost(self, rows: int, verify_s: float) -> float:
        """What a step of ``rows`` rows that measured ``verify_s`` cost (here: the model's figure)."""
        return self.verify(rows)

    def observe(self, rows: int, verify_s: float, head_s: float, heads_run: int) -> None:
        """Times do not move the fixed model."""

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: Any) -> bool:
        return True


class MeasuredCosts:
    """Running means of the measured times: a main forward per row count (``t_verify``), the
    graph rebuild a verify causes (``t_switch``) and one head forward (``t_head``).

    llama.cpp reuses its compute graph while the batch shape stays the same and
    rebuilds it when the shape changes: a verify makes the next one-row step
    rebuild it again. That extra time is measured apart, on the one-row steps
    right after a verify, and charged to every verify.
    """

    measured = True

    def __init__(self, max_rows: int, flash_attn: bool = False, alpha: float = ALPHA) -> None:
        self.max_rows = max_rows
        self.flash_attn = flash_attn  # for the prior shape of unmeasured sizes
        self.alpha = alpha
        self.n_cached = 0  # tokens in the KV cache at the current step
        self.t_verify: dict[int, float] = {}
        self.t_switch = 0.0
        self.t_head = 0.0
        self._last_rows = 1
        self._table: list[float] | None = None  # per row count, at ``_table_at``
        self._table_at = -1  # the context bucket (n_cached // CONTEXT_STEP) of the table
        self._prior: list[float] = []
        self._prior_key: tuple[int, bool] | None = None

    def at(self, n_cached: int) -> None:
        self.n_cached = n_cached

    @property
    def ready(self) -> bool:
        """Whether any forward was timed yet (until then, the policy stays in its warm-up)."""
        return bool(self.t_verify)

    def verify(self, rows: int) -> float:
        """What a step of ``rows`` rows costs: its forward and, for a verify, the rebuild it causes."""
        bucket = self.n_cached // CONTEXT_STEP
        table = self._table
        if table is None or self._table_at != bucket:
            table = self._table = self._cost_table()
            self._table_at = bucket
        t = table[rows] if rows < len(table) else table[-1]
        return t + self.t_switch if rows > 1 else t

    def head(self) -> float:
        return self.t_head

    def measured_rows(self, rows: int) -> bool:
        return rows in self.t_verify

    def step_cost(self, rows: int, verify_s: float) -> float:
        """What a step of ``rows`` rows that took ``verify_s`` cost, the rebuild it causes included."""
        return verify_s + (self.t_switch if rows > 1 else 0.0)

    def _cost_table(self) -> list[float]:
        """Verify time per row count (index = rows), from the measurements, never decreasing.

        An unmeasured size scales the nearest measured one by the prior's shape at
        the current context length (on CPUs the second row is dear, the next ones
        cheap, and with flash attention every row pays the whole context again). A
        larger batch is never taken to cost less than a smaller one: on a shared
        machine one noisy measurement could otherwise make drafts look free.
        """
        prior = self._prior_shape()
        measured = self.t_verify
        sizes = sorted(measured)
        table = [0.0]
        j = 0  # sizes[j] is the nearest measured size at or below rows (or the smallest)
        for rows in range(1, self.max_rows + 1):
            t = measured.get(rows)
            if t is None:
                while j + 1 < len(sizes) and sizes[j + 1] <= rows:
                    j += 1
                ref = sizes[j]
                if j + 1 < len(sizes) and sizes[j + 1] - rows < abs(rows - ref):
                    ref = sizes[j + 1]
                t = measured[ref] * prior[rows] / prior[ref]
            table.append(max(t, table[-1]))
        return table

    def _prior_shape(self) -> list[float]:
        """The prior relative cost of 1..max_rows rows at the current context length (index = rows)."""
        key = (self.n_cached // CONTEXT_STEP, self.flash_attn)
        if self._prior_key != key:
            n = key[0] * CONTEXT_STEP + CONTEXT_STEP // 2
            self._prior = [1.0] + [verify_cost_prior(r, n, flash_attn=self.flash_attn)
                                   for r in range(1, self.max_rows + 1)]
            self._prior_key = key
        return self._prior

    def observe(self, rows: int, verify_s: float, head_s: float, heads_run: int) -> None:
        """One step's times: its main forward of ``rows`` rows, and ``heads_run`` head forwards
        that took ``head_s`` (0 runs: their time is not a draft's, e.g. a head caught up)."""
        a = self.alpha
        after_verify, self._last_rows = self._last_rows > 1, rows
        one = self.t_verify.get(1)
        if rows == 1 and after_verify and one is not None:
            # a step right after a verify: what it cost beyond a step is the verify's rebuild
            extra = max(0.0, verify_s - one)
            self.t_switch = extra if self.t_switch == 0.0 else self.t_switch + a * (extra - self.t_switch)
            return
        old = self.t_verify.get(rows)
        new = verify_s if old is None else old + a * (verify_s - old)
        self.t_verify[rows] = new
        if old is None or abs(new - old) > TABLE_TOLERANCE * old:
            self._table = None
        if heads_run:
            per = head_s / heads_run
            self.t_head = per if self.t_head == 0.0 else self.t_head + a * (per - self.t_head)

    def state(self) -> dict[str, Any]:
        return {"t_verify": {str(b): t for b, t in self.t_verify.items()}, "t_head": self.t_head,
                "t_switch": self.t_switch}

    def restore(self, state: Any) -> bool:
        """Take the times of a :meth:`state`; False (nothing changed) when they are not valid."""
        try:
            t_verify = {int(b): float(t) for b, t in state["t_verify"].items()}
            t_head = float(state["t_head"])
            t_switch = float(state.get("t_switch", 0.0))
        except (KeyError, TypeError, ValueError, AttributeError):
            return False
        times_ok = all(1 <= b <= self.max_rows and 0.0 < t < MAX_SAVED_SECONDS for b, t in t_verify.items())
        if (not t_verify or not times_ok
                or not 0.0 <= t_head < MAX_SAVED_SECONDS or not 0.0 <= t_switch < MAX_SAVED_SECONDS):
            return False
        self.t_verify, self.t_head, self.t_switch = t_verify, t_head, t_switch
        self._table = None
        return True


Costs = MeasuredCosts | FixedCosts
