"""The one allocation protocol: every method gets an :class:`AllocationRun` and returns
:class:`Scores` or an :class:`Assignment`; :func:`build_plan` makes the plan of either.

* ``Scores`` -- a number per unit (the method's metric). The method's own
  ``ratios(metric, target, sizes, **options)`` maps them to raw ratios around the
  target fraction of each axis (the fraction of a unit's cost removed: sparsity's
  fraction pruned), and each axis's budget fitter makes them levels meeting its
  budget exactly. So every score-based method serves every axis.
* ``Assignment`` -- a finished level per layer on one axis (a search's candidate,
  Lua's learned row budgets), checked against that axis's budget; the other axes
  the recipe asks for are fitted uniformly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...engine.forward import visit_blocks
from ...engine.stats import STATISTICS
from ...errors import PrunellaError
from ...registry import Method
from ..plan import AxisPlan, Plan, allocation_units

UNIFORM = "uniform"  # the label of an axis a method does not allocate: the target everywhere


@dataclass
class Scores:
    """A score per unit; ``units`` when the method scored other units than the run's
    (DSA: blocks), ``facts`` for the plan's record."""

    values: dict[str, float]
    units: dict[str, list[str]] | None = None
    granularity: str | None = None
    facts: dict = field(default_factory=dict)


@dataclass
class Assignment:
    """Every layer's value on ``axis`` (and the axis's detail: sparsity's ``nm``, ``rows``)."""

    axis: str
    values: dict[str, float]
    detail: dict = field(default_factory=dict)
    granularity: str | None = None
    metric_name: str | None = None
    metric: dict[str, float] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)


@dataclass
class AllocationRun:
    """What every allocation method receives: the model (a store), the calibration
    windows, the resolved recipe (each axis's methods: the solver), the budget of each
    axis, the units, and where and how the forwards run."""

    store: object
    windows: torch.Tensor | None
    recipe: object
    axes: object  # the axes registry (prunella.methods.AXES)
    budgets: dict  # axis name -> Budget, in axis order
    method: Method
    options: dict
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    progress: bool = True
    units: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method.needs_data and self.windows is None:
            raise PrunellaError(f"allocation {self.method.name!r} needs calibration data")
        self.units = allocation_units(
            list(self.store.layers()), self.store.adapter.blocks_path, self.granularity
        )

    @property
    def granularity(self) -> str:
        return self.recipe.granularity

    @property
    def sizes(self) -> dict[str, int]:
        return {name: rows * cols for name, (rows, cols) in self.store.layers().items()}

    @property
    def allocated(self) -> dict:
        """The budgets of the axes allocations serve (a budget with ``allocated=False``,
        or an axis that declares ``ALLOCATED = False``, is uniform whatever the method)."""
        return {
            n: b
            for n, b in self.budgets.items()
            if b.allocated and getattr(self.axes.get(n), "ALLOCATED", True)
        }

    def budget(self):
        """The one axis a method that assigns levels works on."""
        allocated = self.allocated
        if len(allocated) != 1:
            raise PrunellaError(
                f"allocation {self.method.name!r} allocates one axis at a time; the recipe "
                f"asks for {', '.join(allocated) or 'none it can allocate'}"
            )
        return next(iter(allocated.values()))

    def windows_for(self, tokens: int, available: int | None = None) -> int:
        """How many calibration windows hold ``tokens`` (whole windows, at least one,
        at most ``available``, default all)."""
        available = len(self.windows) if available is None else available
        return max(1, min(available, round(tokens / self.windows.shape[1])))

    def per_unit(
        self, metric: Callable[[list[tuple]], float], units: dict | None = None
    ) -> dict[str, float]:
        """``metric(layers)`` of every unit from its layers' ``(weight, stats)`` pairs, in
        one visit of the dense blocks: a forward over the windows for the statistics the
        method needs, the weights read when it needs them (else shapes only)."""
        needs = self.method.needs
        unit_of = {n: u for u, names in (units or self.units).items() for n in names}
        found: dict[str, float] = {}

        def visit(prefix: str, block_layers: dict) -> None:
            grouped: dict[str, list] = {}
            for name, pair in block_layers.items():
                grouped.setdefault(unit_of[name], []).append(pair)
            for unit, layers in grouped.items():
                found[unit] = metric(layers)

        visit_blocks(
            self.store, visit, needs=needs & STATISTICS, read=bool(needs),
            windows=self.windows, device=self.device, dtype=self.dtype,
            batch_size=self.batch_size, progress=self.progress,
            desc=f"allocation ({self.method.name})",
        )  # fmt: skip
        return found


def allocate(run: AllocationRun) -> Plan:
    """The plan of ``run.method`` on ``run``: its scores or assignment, made a plan."""
    if not run.allocated and run.method.name != UNIFORM:
        raise PrunellaError(
            f"allocation {run.method.name!r} has nothing to allocate: "
            f"{', '.join(run.budgets)} is uniform for now (add --sparsity to allocate it)"
        )
    return build_plan(run, run.method.allocate(run, **run.options))


def build_plan(run: AllocationRun, result: Scores | Assignment) -> Plan:
    """Every axis the recipe asks for, fitted from ``result`` (see the module docstring)."""
    shapes = run.store.layers()
    plans = {}
    for name, budget in run.budgets.items():
        axis = run.axes.get(name)
        clamp = budget.record  # the axis's own names for its clamp (sparsity: min/max_sparsity)
        assigned = isinstance(result, Assignment) and result.axis == name
        if name in run.allocated and assigned:
            plan = AxisPlan(
                name, budget.target, result.values, run.method.name,
                result.granularity or run.granularity, run.options | clamp | result.facts,
                result.metric_name, result.metric, result.detail,
            )  # fmt: skip
            axis.check(plan, run.store.layers(), budget, f"allocation {run.method.name!r}")
        elif name in run.allocated and isinstance(result, Scores):
            plan = _fit_scores(run, axis, budget, result, shapes, clamp)
        else:  # another axis's assignment, or an axis allocations do not serve: uniform
            values, detail = axis.fit(dict.fromkeys(shapes, budget.fraction), shapes, budget)
            plan = AxisPlan(name, budget.target, values, UNIFORM, "layer", clamp, detail=detail)
        plans[name] = plan
    return Plan(plans)


def _fit_scores(run, axis, budget, scores: Scores, shapes: dict, clamp: dict) -> AxisPlan:
    """An axis plan from per-unit scores: the method's ratios, the axis's fitter."""
    method = run.method
    sizes = {name: rows * cols for name, (rows, cols) in shapes.items()}
    units = scores.units or run.units
    names = list(units)
    metric = torch.tensor([scores.values[u] for u in names], dtype=torch.float64)
    unit_sizes = torch.tensor([sum(sizes[n] for n in units[u]) for u in names], dtype=torch.float64)
    per_unit = method.ratios(metric, budget.fraction, sizes=unit_sizes, **run.options)
    raw = {n: per_unit[i].item() for i, u in enumerate(names) for n in units[u]}
    values, detail = axis.fit({n: raw[n] for n in sizes}, shapes, budget)
    kept = {u: v for u, v in scores.values.items() if not math.isnan(v)}
    return AxisPlan(
        axis.NAME, budget.target, values, method.name, scores.granularity or run.granularity,
        run.options | clamp | scores.facts, method.METRIC, kept if method.METRIC else {}, detail,
    )  # fmt: skip
