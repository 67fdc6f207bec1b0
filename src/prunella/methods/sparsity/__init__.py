"""The sparsity axis: weights set to zero, under a pattern, by a layer-wise solver.

A solver prunes one weight matrix ``W`` (``[out_features, in_features]``, float32)
under a :mod:`pattern <prunella.methods.sparsity.patterns>`, given the layer
statistics it declares in ``NEEDS``; it returns the new weight (pruned entries
exactly zero, survivors possibly updated) and a dict of facts for the report. A
solver is one module with ``PAPER``, ``NEEDS``, ``OPTIONS`` and ``prune(weight,
pattern, stats, **options)`` (see :mod:`prunella.registry`), and one line in
:data:`SOLVERS`; third-party solvers register through the ``prunella.solvers``
entry point group. A row method (:mod:`prunella.methods.rows`) spreads a layer's
sparsity over its rows around the solver.

The axis (see :mod:`prunella.methods`): the budget is the fraction of the prunable
weights pruned (``--sparsity``, or implied by an ``N:M`` ``--pattern``); a layer's
level is its pattern: an unstructured fraction, ``N:M``, or a count per row. The
budget fitter makes an unstructured budget exact to the weight
(:func:`~prunella.methods.plan.fit_budget`) and mixes ``N:M`` levels of
the same ``M`` for an ``N:M`` one (:func:`fit_nm_levels`: as close as the levels allow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import AfterValidator, Field

from ...errors import PrunellaError
from ...registry import Method, method_field
from ..plan import AxisPlan, Budget, fit_budget
from ..rows import ROWS
from .patterns import NM, Pattern, RowBudget, Unstructured, check_sparsity, parse_pattern
from .solvers import SOLVERS, Solver, get_solver  # noqa: F401  (the axis's registry, re-exported)

NAME = "sparsity"
ORDER = 20  # after structure, before bits
DEFAULT = True  # a recipe that asks for no axis prunes (to 50%)
FIELDS = {
    "sparsity": (
        Annotated[float | None, AfterValidator(lambda s: None if s is None else check_sparsity(s))],
        Field(None, description="Fraction of weights to prune, in [0, 1)."),
    ),
    "pattern": (str, Field("unstructured", description="'unstructured', or N:M such as 2:4.")),
    "solver": method_field("sparsegpt", "Layer-wise solver (see 'prunella methods')."),
    "rows": method_field(
        "uniform", "How each layer's sparsity is spread over its rows (uniform, trim)."
    ),
    "min_sparsity": (
        float,
        Field(0.0, ge=0.0, lt=1.0, description="Lowest sparsity of any layer."),
    ),
    "max_sparsity": (
        float,
        Field(0.99, ge=0.0, lt=1.0, description="Highest sparsity of any layer."),
    ),
}
METHODS = {"solver": SOLVERS, "rows": ROWS}


def budget(recipe, default: bool = False):
    """The recipe's sparsity budget: ``--sparsity`` or an ``N:M`` pattern (with
    ``default``, 50% unstructured when neither is given); ``None`` when not asked for."""
    pattern = parse_pattern(recipe.pattern, recipe.sparsity)
    if not default and recipe.sparsity is None and not isinstance(pattern, NM):
        return None
    lo, hi = recipe.min_sparsity, recipe.max_sparsity
    if not 0.0 <= lo <= hi < 1.0:
        raise PrunellaError(f"need 0 <= min sparsity <= max sparsity < 1, got {lo}, {hi}")
    clamp = {"min_sparsity": lo, "max_sparsity": hi}
    return Budget(NAME, pattern.sparsity, pattern.sparsity, lo, hi, pattern, clamp)


def nm_level_range(m: int, lo: float = 0.0, hi: float = 0.99) -> tuple[int, int]:
    """The ``N`` allowed for ``M = m`` under the clamp: ``1 <= N <= M - 1`` and
    ``lo <= 1 - N / M <= hi``."""
    fewest = max(1, math.ceil(round((1 - hi) * m, 9)))
    most = min(m - 1, math.floor(round((1 - lo) * m, 9)))
    if fewest > most:
        raise PrunellaError(
            f"no N:{m} level has a sparsity within [{lo}, {hi}]: "
            "widen --min-sparsity/--max-sparsity"
        )
    return fewest, most


def fit_nm_levels(
    raw: torch.Tensor, sizes: torch.Tensor, target: float, m: int, lo: float, hi: float
) -> torch.Tensor:
    """Per-layer ``N`` (kept of every ``m``) with the weighted sparsity closest to ``target``,
    every level's sparsity within ``[lo, hi]``: ``N_l = round((1 - s_l - c) m)`` within
    ``[1, m - 1]``, one common shift ``c`` (bisection)."""
    raw, sizes = raw.double(), sizes.double()
    fewest, most = nm_level_range(m, lo, hi)

    def levels(shift: float) -> torch.Tensor:
        return ((1 - raw - shift) * m).round().clamp(fewest, most)

    def sparsity(n: torch.Tensor) -> float:
        return (sizes * (1 - n / m)).sum().item() / sizes.sum().item()

    a, b = -1.0, 1.0
    for _ in range(60):
        mid = (a + b) / 2
        a, b = (mid, b) if sparsity(levels(mid)) < target else (a, mid)
    best = min((levels(a), levels(b)), key=lambda n: abs(sparsity(n) - target))
    return best.long()


def fit(raw: dict[str, float], shapes: dict[str, tuple[int, int]], budget) -> tuple[dict, dict]:
    """Per-layer sparsities from raw ones (and ``N:M`` levels for an ``N:M`` budget)."""
    names = list(raw)
    sizes = {name: rows * cols for name, (rows, cols) in shapes.items()}
    raw_t = torch.tensor([raw[n] for n in names], dtype=torch.float64)
    size_t = torch.tensor([sizes[n] for n in names], dtype=torch.float64)
    if isinstance(budget.spec, NM):
        m = budget.spec.m
        kept = fit_nm_levels(raw_t, size_t, budget.target, m, budget.lo, budget.hi)
        nm = {name: [int(n), m] for name, n in zip(names, kept, strict=True)}
        return {name: 1 - n / m for name, (n, m) in nm.items()}, {"nm": nm}
    fitted = fit_budget(raw_t, size_t, budget.target, budget.lo, budget.hi)
    return {name: s.item() for name, s in zip(names, fitted, strict=True)}, {}


def levels(plan: AxisPlan, shapes: dict[str, tuple[int, int]]) -> dict[str, Pattern]:
    """Each layer's pattern: ``N:M``, a count per row, or an unstructured fraction."""
    nm, rows = plan.detail.get("nm"), plan.detail.get("rows")
    if nm is not None:
        return {name: NM(*nm[name]) for name in plan.values}
    if rows is not None:
        return {name: RowBudget(torch.tensor(rows[name]), shapes[name][1]) for name in plan.values}
    return {name: Unstructured(s) for name, s in plan.values.items()}


def check(plan: AxisPlan, shapes: dict[str, tuple[int, int]], budget, where: str) -> None:
    """A sparsity plan's values are fractions in [0, 1) meeting its target to one weight
    per layer, its ``nm`` and ``rows`` agree with them, and the recipe's pattern can
    honour it."""
    unknown = sorted(set(plan.detail) - {"nm", "rows"})
    if unknown:
        raise PrunellaError(f"{where}: unknown key {unknown[0]!r} in the sparsity plan")
    for name, value in plan.values.items():
        try:
            check_sparsity(value)
        except PrunellaError:
            raise PrunellaError(
                f"{where}: sparsity of {name!r} must be in [0, 1), got {value}"
            ) from None
    try:
        check_sparsity(plan.target)
    except PrunellaError:
        raise PrunellaError(f"{where}: target must be in [0, 1), got {plan.target!r}") from None
    sizes = {name: rows * cols for name, (rows, cols) in shapes.items()}
    pruned = sum(round(plan.values[n] * sizes[n]) for n in shapes)
    total = sum(sizes.values())
    nm, rows = plan.detail.get("nm"), plan.detail.get("rows")
    # N:M levels meet the target as closely as the levels allow; the rest to one weight
    if nm is None and abs(pruned - plan.target * total) > len(shapes):
        raise PrunellaError(
            f"{where} prunes {pruned / total:.4%} of the weights, not the target "
            f"{plan.target:.4%} (allowed: one weight per layer)"
        )
    if nm is not None:
        if not isinstance(nm, dict) or set(nm) != set(shapes):
            raise PrunellaError(f"{where}: 'nm' must give N:M for every layer")
        for name, pair in nm.items():
            if not (
                isinstance(pair, list) and len(pair) == 2 and all(type(v) is int for v in pair)
            ):
                raise PrunellaError(f"{where}: 'nm' of {name!r} must be [N, M]")
            level = NM(*pair)
            if abs(level.sparsity - float(plan.values[name])) > 1e-6:
                raise PrunellaError(
                    f"{where}: {name!r} has nm {level} ({level.sparsity:.4g} sparse) but "
                    f"sparsity {plan.values[name]}"
                )
    if rows is not None:
        if nm is not None:
            raise PrunellaError(f"{where}: 'rows' and 'nm' exclude each other")
        if not isinstance(rows, dict) or set(rows) != set(shapes):
            raise PrunellaError(f"{where}: 'rows' must give counts for every layer")
        for name, counts in rows.items():
            out, cols = shapes[name]
            if not (
                isinstance(counts, list)
                and len(counts) == out
                and all(type(c) is int and 0 <= c <= cols for c in counts)
            ):
                raise PrunellaError(
                    f"{where}: 'rows' of {name!r} must be {out} counts in [0, {cols}]"
                )
            if abs(sum(counts) - float(plan.values[name]) * out * cols) > 0.5:
                raise PrunellaError(
                    f"{where}: the row counts of {name!r} do not add up to its sparsity "
                    f"{plan.values[name]}"
                )
        if budget is not None and not isinstance(budget.spec, Unstructured):
            raise PrunellaError(
                f"{where} gives per-row budgets, which a {budget.spec} pattern cannot honour"
            )


def layer_bytes(shape: tuple[int, int], level: Pattern, nbytes: int, fmt: str) -> int:
    """The layer's bytes once pruned: unchanged in a dense checkpoint; packed
    (sparse-bitmask), its kept values, a bit per weight and an offset per row."""
    if fmt != "sparse-bitmask":
        return nbytes
    rows, cols = shape
    element = nbytes // (rows * cols)
    kept = rows * cols - _pruned(shape, level)
    return kept * element + rows * math.ceil(cols / 8) + 8 * rows + 16


def _pruned(shape: tuple[int, int], level: Pattern) -> int:
    if isinstance(level, RowBudget):
        return int(level.counts.sum())
    if isinstance(level, NM):
        return shape[0] * (shape[1] // level.m) * (level.m - level.n)
    return round(level.sparsity * shape[0] * shape[1])


@dataclass
class Pruner:
    """The sparsity axis's compressor: a row method around the recipe's solver."""

    solver: Method
    solver_options: dict
    rows: Method
    rows_options: dict
    axis: str = NAME

    @property
    def name(self) -> str:
        return f"{self.solver.name}, {self.rows.name} rows"

    @property
    def needs(self) -> frozenset[str]:
        return self.solver.needs | self.rows.needs

    @property
    def data_free_note(self) -> str:
        return f"pruned by {SOLVERS.fallback().name}"

    def __call__(
        self, weight: torch.Tensor, level: Pattern, stats, data_free: bool = False
    ) -> tuple[torch.Tensor, dict]:
        solver, options = self.solver, self.solver_options
        rows, rows_options = self.rows, self.rows_options
        if data_free:  # too few calibration tokens: what needs no statistics
            solver, rows = SOLVERS.fallback(), ROWS.fallback()
            options, rows_options = solver.defaults(), rows.defaults()

        def solve(w: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, dict]:
            return solver.prune(w, pattern, stats, **options)

        return rows.prune(weight, level, stats, solve, **rows_options)

    def describe(self, level: Pattern) -> dict:
        return {"pattern": str(level), "target_sparsity": level.sparsity}


def compressor(recipe) -> Pruner:
    return Pruner(
        SOLVERS.get(recipe.solver.name),
        recipe.solver.options,
        ROWS.get(recipe.rows.name),
        recipe.rows.options,
    )


def report(recipe, plan: AxisPlan, results: list[dict]) -> dict:
    """The report's sparsity keys (solver, rows, pattern, target) and its summary line."""
    pattern = str(parse_pattern(recipe.pattern, recipe.sparsity))
    sizes = [r["shape"][0] * r["shape"][1] for r in results]
    achieved = sum(r["sparsity"] * n for r, n in zip(results, sizes, strict=True)) / sum(sizes)
    return {
        "solver": recipe.solver.name,
        "solver_options": recipe.solver.options,
        "rows": recipe.rows.name,
        "rows_options": recipe.rows.options,
        "pattern": pattern,
        "target_sparsity": plan.target,
        "summary": f"{achieved:.2%} sparsity ({pattern}, {recipe.solver.name}, {plan.method} "
        f"allocation, {recipe.rows.name} rows)",
    }


def record(recipe, plan: AxisPlan) -> dict:
    """An unstructured run records the sparsity it used (a plan file may have given it)."""
    pattern = parse_pattern(recipe.pattern, recipe.sparsity)
    return {"sparsity": plan.target} if isinstance(pattern, Unstructured) else {}


@dataclass
class LevelSolver:
    """What fills the searches' level database: the solver alone (no row method), every
    level of every layer from the dense weight and the dense model's statistics."""

    solver: Method
    options: dict

    @property
    def name(self) -> str:
        return self.solver.name

    @property
    def needs(self) -> frozenset[str]:
        return self.solver.needs

    @property
    def key(self) -> dict:
        return {"solver": self.solver.name, "options": self.options}

    def __call__(self, weight: torch.Tensor, level: Pattern, stats) -> torch.Tensor:
        return self.solver.prune(weight, level, stats, **self.options)[0]


def level_solver(recipe) -> LevelSolver:
    return LevelSolver(SOLVERS.get(recipe.solver.name), recipe.solver.options)


def ladder(shapes: dict[str, tuple[int, int]], budget: Budget, hidden_size: int, levels: int):
    """EvoPress's ladder of sparsity levels around the target (or of ``N:M`` levels)."""
    from ..search.levels import make_ladder

    sizes = {name: rows * cols for name, (rows, cols) in shapes.items()}
    return make_ladder(sizes, budget.spec, hidden_size, levels, lo=budget.lo, hi=budget.hi)
