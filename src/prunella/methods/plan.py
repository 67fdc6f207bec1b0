"""Plans: how every prunable layer is compressed, on each axis, and what that costs.

A :class:`Plan` holds one :class:`AxisPlan` per axis it compresses: the axis's target,
each layer's value on the axis (sparsity: the fraction of its weights pruned) and
the axis's own per-layer detail (sparsity: ``nm`` levels or ``rows`` counts), with
how they were derived (method, granularity, options, the method's metric per unit).
It also states its cost: the bytes of the checkpoint it writes.

A unit of allocation is a decoder block, one linear layer (``granularity="layer"``),
or with ``granularity="expert"`` one expert of a mixture of experts and the rest of
its block (:func:`allocation_units`).

Exact budget (:func:`fit_budget`, every axis's fitter for fractions): with ``n_l``
weights in layer ``l`` and raw ratios ``s_l``, find the shift ``c`` with
``sum_l n_l clip(s_l + c, lo, hi) = target * sum_l n_l`` (bisection; the sum is
monotone in ``c``), then round to whole weights and hand the leftover weights to the
layers with the largest rounding remainders, so the total is exactly
``round(target * sum_l n_l)``.

Files: ``prunella-plan/2`` (``{"format", "axes": {axis: {...}}, "cost",
"model_fingerprint"}``); a ``prunella-allocation/1`` file (a sparsity plan alone) still
loads. In an axis's JSON the per-layer values sit under the axis's name
(``"sparsity": {layer: s}``). ``model_fingerprint`` is the digest of the weights of the
model the plan was made for (:func:`prunella.io.checkpoint.scan`; absent from older
files and from plans of a model given in memory): a plan used on another model is
said in one warning line, and still used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.experts import expert_of
from ..errors import PrunellaError
from ..io.folders import read_json

GRANULARITIES = ("block", "layer", "expert")
FORMAT = "prunella-plan/2"
LEGACY = "prunella-allocation/1"
LEGACY_AXIS = "sparsity"  # the one axis a prunella-allocation/1 file holds
COMMON = ("target", "method", "granularity", "params", "metric_name", "metric")


def allocation_units(layers: list[str], blocks_path: str, granularity: str) -> dict[str, list[str]]:
    """Unit name -> its layers: per block (``model.layers.3``), per layer, or per expert
    (``model.layers.3.mlp.experts.5``: its gate, up and down), the rest of each block
    being one unit."""
    if granularity not in GRANULARITIES:
        raise PrunellaError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    units: dict[str, list[str]] = {}
    for name in layers:
        if granularity == "layer":
            unit = name
        elif granularity == "expert" and expert_of(name):
            unit = expert_of(name)
        else:
            unit = name[: name.index(".", len(blocks_path) + 1)]
        units.setdefault(unit, []).append(name)
    return units


@dataclass(frozen=True)
class Budget:
    """What a recipe asks of one axis: ``target`` in the axis's own unit (sparsity: the
    fraction of weights pruned), ``fraction`` the share of the layers' cost it removes
    (what allocations map their scores around), each layer's fraction within ``[lo, hi]``,
    ``spec``, the axis's own form of the target (sparsity: the pattern), and
    ``allocated``: whether allocations place it (else it is the same in every layer, as
    bits at a whole width are)."""

    axis: str
    target: float
    fraction: float
    lo: float = 0.0
    hi: float = 0.99
    spec: object = None
    allocated: bool = True
    record: dict = field(default_factory=dict)  # what a plan's params record of it (the clamp)


@dataclass
class AxisPlan:
    """One axis of a plan: every layer's value on it, and how they were derived."""

    axis: str
    target: float
    values: dict[str, float]
    method: str = "uniform"
    granularity: str = "block"
    params: dict = field(default_factory=dict)
    metric_name: str | None = None
    metric: dict[str, float] = field(default_factory=dict)
    detail: dict[str, dict] = field(default_factory=dict)  # the axis's own per-layer mappings

    def to_json(self) -> dict:
        return {
            "target": self.target,
            self.axis: self.values,
            "method": self.method,
            "granularity": self.granularity,
            "params": self.params,
            "metric_name": self.metric_name,
            "metric": self.metric,
            **self.detail,
        }

    @classmethod
    def from_json(cls, axis: str, data: dict) -> AxisPlan:
        return cls(
            axis=axis,
            target=data.get("target"),
            values={n: float(v) for n, v in data[axis].items()},
            method=str(data.get("method", "file")),
            granularity=str(data.get("granularity", "layer")),
            params=dict(data.get("params") or {}),
            metric_name=str(data["metric_name"]) if data.get("metric_name") is not None else None,
            metric=dict(data.get("metric") or {}),
            detail={k: v for k, v in data.items() if k not in (*COMMON, axis) and v is not None},
        )

    def mean(self, sizes: dict[str, int]) -> float:
        """The ``sizes``-weighted mean value (sparsity: the fraction pruned)."""
        return sum(self.values[n] * sizes[n] for n in sizes) / sum(sizes.values())


@dataclass
class Plan:
    """How each layer is compressed on each axis (in axis order), and the cost."""

    axes: dict[str, AxisPlan]
    cost: dict = field(default_factory=dict)
    model_fingerprint: str | None = None  # the digest of the weights it was made for
    structure: dict | None = None  # the report of a structure cut before it

    def __getitem__(self, axis: str) -> AxisPlan:
        return self.axes[axis]

    def __contains__(self, axis: str) -> bool:
        return axis in self.axes

    def to_json(self) -> dict:
        from .structure import plan_section

        cut = {"structure": plan_section(self.structure)} if self.structure else {}
        return {
            "format": FORMAT,
            **cut,  # per block of the dense model; the axes name the smaller model's layers
            "axes": {name: axis.to_json() for name, axis in self.axes.items()},
            "cost": self.cost,
            "model_fingerprint": self.model_fingerprint,
        }

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        """A plan from its JSON (either format; unchecked: :func:`load_plan` checks)."""
        bodies = _axis_bodies(data)
        axes = {name: AxisPlan.from_json(name, body) for name, body in bodies.items()}
        cost = data.get("cost")
        fingerprint = data.get("model_fingerprint")
        return cls(
            axes,
            dict(cost) if isinstance(cost, dict) else {},
            fingerprint if isinstance(fingerprint, str) else None,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    def summary(self) -> dict:
        """The plan for the report: its axes, a detail that holds long lists per layer
        (sparsity's row counts) only counted (``rows_layers``), and the cost."""
        axes = {}
        for name, axis in self.axes.items():
            body = axis.to_json()
            for key, value in axis.detail.items():
                if any(isinstance(v, list) and len(v) > 2 for v in value.values()):
                    body.pop(key)
                    body[f"{key}_layers"] = len(value)
            axes[name] = body
        return {"axes": axes, "cost": self.cost}


def fit_budget(
    raw: torch.Tensor, sizes: torch.Tensor, target: float, lo: float = 0.0, hi: float = 0.99
) -> torch.Tensor:
    """Shift and clip ``raw`` so the ``sizes``-weighted mean is exactly ``target``.

    Returns per-layer fractions ``k_l / n_l`` with integer ``k_l`` summing to
    ``round(target * sum n_l)``.
    """
    if not lo <= target <= hi:
        raise PrunellaError(f"target {target} lies outside the clamp [{lo}, {hi}]")
    raw, sizes = raw.double(), sizes.double()
    total = target * sizes.sum()
    fewest, most = (lo * sizes - 1e-9).ceil(), (hi * sizes + 1e-9).floor()  # whole weights
    low, high = fewest / sizes, most / sizes

    def pruned(shift: float) -> float:
        return (sizes * torch.minimum(torch.maximum(raw + shift, low), high)).sum().item()

    a, b = lo - raw.max().item() - 1, hi - raw.min().item() + 1
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if pruned(mid) < total else (a, mid)
    exact = sizes * torch.minimum(torch.maximum(raw + (a + b) / 2, low), high)
    counts = exact.floor().clamp(fewest, most)
    leftover = round(total.item()) - int(counts.sum().item())
    room = counts < most if leftover > 0 else counts > fewest
    remainder = exact - counts if leftover > 0 else counts - exact
    order = [i for i in remainder.argsort(descending=True).tolist() if room[i]]
    if len(order) < abs(leftover):
        raise PrunellaError(f"target {target} cannot be met within [{lo}, {hi}]")
    counts[order[: abs(leftover)]] += 1 if leftover > 0 else -1
    return counts / sizes


def plan_cost(
    plan: Plan, axes, shapes: dict[str, tuple[int, int]], element: int, other: int, fmt: str
) -> dict:
    """The bytes of the checkpoint ``plan`` writes in format ``fmt``: every prunable layer
    as its axes leave it (``element`` bytes a weight before), plus ``other`` bytes of
    tensors outside them."""
    levels = {name: axes.get(name).levels(axis, shapes) for name, axis in plan.axes.items()}
    dense = sum(rows * cols * element for rows, cols in shapes.values())
    layers = 0
    for layer, shape in shapes.items():
        nbytes = shape[0] * shape[1] * element
        for name in plan.axes:
            nbytes = axes.get(name).layer_bytes(shape, levels[name][layer], nbytes, fmt)
        layers += nbytes
    return {
        "format": fmt,
        "bytes": layers + other,
        "dense_bytes": dense + other,
        "layer_bytes": layers,
        "dense_layer_bytes": dense,
    }


def load_plan(
    path: str | Path, layers: dict[str, tuple[int, int]], budgets: dict | None = None, axes=None
) -> Plan:
    """Read and validate a plan written by ``prunella allocate --json`` (or edited by
    hand): every layer on every axis, each axis's own checks, every axis the recipe asks
    for present with the recipe's target (``budgets``: axis -> its budget)."""
    path = Path(path)
    where = f"allocation file {path}"
    data = read_json(path, where)
    if not isinstance(data, dict):
        raise PrunellaError(f"{where} must hold a JSON object")
    bodies = _axis_bodies(data, where)
    fingerprint = data.get("model_fingerprint")
    plan = Plan(
        {name: _axis_plan(name, body, layers, where) for name, body in bodies.items()},
        model_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
    )
    check_plan(plan, layers, budgets or {}, axes, where)
    return plan


def _axis_bodies(data: dict, where: str = "plan") -> dict:
    """Axis name -> its JSON, from a plan of either format."""
    if data.get("format") == FORMAT:
        bodies = data.get("axes")
        if bodies == {} and data.get("structure") is not None:
            return {}  # a structure cut alone
        if not isinstance(bodies, dict) or not bodies:
            raise PrunellaError(f"{where} has no 'axes' mapping of axis -> plan")
        return bodies
    if data.get("format", LEGACY) == LEGACY:
        return {LEGACY_AXIS: {k: v for k, v in data.items() if k != "format"}}
    raise PrunellaError(f"{where} has an unknown format {data.get('format')!r}")


def check_plan(plan: Plan, layers: dict, budgets: dict, axes=None, where: str = "plan") -> None:
    """Each axis of ``plan`` by its own checks, every axis in ``budgets`` (what the
    recipe asks for) present with that target; the axes put in their order."""
    if axes is None:
        from . import AXES as axes
    missing = sorted(set(budgets) - set(plan.axes))
    if missing:
        raise PrunellaError(f"{where} has no {missing[0]!r} axis, which the recipe asks for")
    for name, axis_plan in plan.axes.items():
        axis = axes.get(name)
        budget = budgets.get(name)
        if axis_plan.target is None:  # a plan file that states no target
            axis_plan.target = budget.target if budget is not None else _mean(axis_plan, layers)
        elif budget is not None and abs(axis_plan.target - budget.target) > 1e-9:
            raise PrunellaError(
                f"{where} is for {name} {axis_plan.target}, but the recipe asks for {budget.target}"
            )
        axis.check(axis_plan, layers, budget, where)
    plan.axes = dict(sorted(plan.axes.items(), key=lambda item: axes.get(item[0]).ORDER))


def _axis_plan(name: str, body, layers: dict, where: str) -> AxisPlan:
    """One axis of a plan file: numbers for every layer; its target (where the file gives
    none, the values' mean)."""
    if not isinstance(body, dict) or not isinstance(body.get(name), dict):
        raise PrunellaError(f"{where} has no {name!r} mapping of layer -> value")
    values = body[name]
    unknown = sorted(set(values) - set(layers))
    if unknown:
        raise PrunellaError(
            f"{where} names {len(unknown)} layer(s) this model does not have, e.g. {unknown[0]!r}"
        )
    missing = sorted(set(layers) - set(values))
    if missing:
        raise PrunellaError(
            f"{where} gives no {name} for {len(missing)} layer(s), e.g. {missing[0]!r}"
        )
    for layer, value in values.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise PrunellaError(f"{where}: {name} of {layer!r} is not a number")
    for key in ("params", "metric"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise PrunellaError(f"{where}: {key!r} must be a mapping")
    target = body.get("target")
    if target is not None and (not isinstance(target, int | float) or isinstance(target, bool)):
        raise PrunellaError(f"{where}: target must be a number, got {target!r}")
    plan = AxisPlan.from_json(name, body)
    plan.target = None if target is None else float(target)  # None: the recipe's, or the mean
    return plan


def _mean(plan: AxisPlan, layers: dict) -> float:
    """The values' weighted mean; NaN where a value is not a sane number (NaN, Inf, 1e308),
    which the axis's own check then names with its layer."""
    if not all(math.isfinite(plan.values[n]) and abs(plan.values[n]) < 1e6 for n in layers):
        return math.nan
    sizes = {n: r * c for n, (r, c) in layers.items()}
    return sum(round(plan.values[n] * sizes[n]) for n in layers) / sum(sizes.values())


def check_finite(values, what: str) -> None:
    """One line when a method's scores are NaN or infinite."""
    if not all(math.isfinite(v) for v in values):
        raise PrunellaError(f"{what} is not finite on the calibration windows")
