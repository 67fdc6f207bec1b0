"""Plans: a sparsity (and, for N:M, a level) per prunable layer, fitted to the budget.

An allocation method turns a per-unit *metric* (a unit is a decoder block, one
linear layer with ``granularity="layer"``, or with ``granularity="expert"`` one
expert of a mixture of experts and the rest of its block) into raw per-unit sparsities
around the target; :func:`build_plan` then makes the budget exact and expands
units to layers.

Exact budget: with ``n_l`` weights in layer ``l`` and raw sparsities ``s_l``,
find the shift ``c`` with ``sum_l n_l clip(s_l + c, lo, hi) = target * sum_l n_l``
(bisection; the sum is monotone in ``c``), then round to whole weights and hand
the leftover weights to the layers with the largest rounding remainders, so the
number of pruned weights is exactly ``round(target * sum_l n_l)``.

With an ``N:M`` pattern, allocation mixes ``N:M`` levels of the same ``M``
(e.g. 3:8, 4:8, 5:8): each layer gets ``N_l = round((1 - s_l) M)`` within
``[1, M - 1]`` and within the clamp ``[lo, hi]``, with one common shift chosen so
the parameter-weighted sparsity is as close to the target as these discrete
levels allow (reported, not exact).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ...engine.experts import expert_of
from ...errors import PrunellaError
from ...registry import Method
from ..sparsity.patterns import NM, Pattern, RowBudget, Unstructured, check_sparsity

GRANULARITIES = ("block", "layer", "expert")


def allocation_units(layers: list[str], blocks_path: str, granularity: str) -> dict[str, list[str]]:
    """Unit name -> its layers: per block (``model.layers.3``), per layer, or per expert
    (``model.layers.3.mlp.experts.5``: its gate, up and down), the rest of each block
    being one unit."""
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


@dataclass
class Plan:
    """A sparsity per prunable layer, with how it was derived. Serialises to JSON."""

    target: float
    sparsity: dict[str, float]
    method: str = "uniform"
    granularity: str = "block"
    params: dict = field(default_factory=dict)
    metric_name: str | None = None
    metric: dict[str, float] = field(default_factory=dict)
    nm: dict[str, list[int]] | None = None
    rows: dict[str, list[int]] | None = None  # weights pruned in each row (per-row budgets)

    def patterns(self, shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, Pattern]:
        """Each layer's pattern; per-row budgets (``rows``) need the layers' ``shapes``."""
        if self.nm is not None:
            return {name: NM(*self.nm[name]) for name in self.sparsity}
        if self.rows is not None:
            if shapes is None:
                raise ValueError("a plan with per-row budgets needs the layer shapes")
            return {
                name: RowBudget(torch.tensor(self.rows[name]), shapes[name][1])
                for name in self.sparsity
            }
        return {name: Unstructured(s) for name, s in self.sparsity.items()}

    def to_json(self) -> dict:
        data = asdict(self)
        if self.rows is None:
            del data["rows"]
        return {"format": "prunella-allocation/1", **data}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


def fit_budget(
    raw: torch.Tensor, sizes: torch.Tensor, target: float, lo: float = 0.0, hi: float = 0.99
) -> torch.Tensor:
    """Shift and clip ``raw`` so the ``sizes``-weighted mean is exactly ``target``.

    Returns per-layer sparsities ``k_l / n_l`` with integer ``k_l`` summing to
    ``round(target * sum n_l)``.
    """
    if not lo <= target <= hi:
        raise PrunellaError(f"target sparsity {target} lies outside the clamp [{lo}, {hi}]")
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
        raise PrunellaError(f"target sparsity {target} cannot be met within [{lo}, {hi}]")
    counts[order[: abs(leftover)]] += 1 if leftover > 0 else -1
    return counts / sizes


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
    raw: torch.Tensor, sizes: torch.Tensor, target: float, m: int, lo: float = 0.0, hi: float = 0.99
) -> torch.Tensor:
    """Per-layer ``N`` (kept of every ``m``) with the weighted sparsity closest to ``target``,
    every level's sparsity within ``[lo, hi]``."""
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


def build_plan(
    method: Method,
    unit_metric: dict[str, float],
    units: dict[str, list[str]],
    sizes: dict[str, int],
    target: float,
    pattern: Pattern,
    granularity: str,
    params: dict,
    lo: float = 0.0,
    hi: float = 0.99,
) -> Plan:
    """Per-layer sparsities from per-unit metrics (``units`` maps unit -> its layer names)."""
    names = list(sizes)
    unit_names = list(units)
    metric = torch.tensor([unit_metric[u] for u in unit_names], dtype=torch.float64)
    unit_sizes = torch.tensor(
        [sum(sizes[n] for n in units[u]) for u in unit_names], dtype=torch.float64
    )
    per_unit = method.sparsities(metric, target, sizes=unit_sizes, **params)
    raw = {n: per_unit[i].item() for i, u in enumerate(unit_names) for n in units[u]}
    raw_t = torch.tensor([raw[n] for n in names], dtype=torch.float64)
    size_t = torch.tensor([sizes[n] for n in names], dtype=torch.float64)
    plan = Plan(
        target=target,
        sparsity={},
        method=method.name,
        granularity=granularity,
        params=params | {"min_sparsity": lo, "max_sparsity": hi},
        metric_name=method.METRIC,
        # a unit the metric does not apply to (NaN: not an expert, ...) is left out
        metric={u: v for u, v in unit_metric.items() if not math.isnan(v)} if method.METRIC else {},
    )
    if isinstance(pattern, NM):
        n_levels = fit_nm_levels(raw_t, size_t, target, pattern.m, lo, hi)
        plan.nm = {name: [int(n), pattern.m] for name, n in zip(names, n_levels, strict=True)}
        plan.sparsity = {
            name: 1 - int(n) / pattern.m for name, n in zip(names, n_levels, strict=True)
        }
    else:
        fitted = fit_budget(raw_t, size_t, target, lo, hi)
        plan.sparsity = {name: s.item() for name, s in zip(names, fitted, strict=True)}
    return plan


def load_plan(
    path: str | Path, layers: dict[str, tuple[int, int]], target: float | None = None
) -> Plan:
    """Read and validate a plan written by ``prunella allocate --json`` (or edited by hand)."""
    path = Path(path)
    if not path.is_file():
        raise PrunellaError(f"allocation file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrunellaError(f"allocation file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("sparsity"), dict):
        raise PrunellaError(f"allocation file {path} has no 'sparsity' mapping of layer -> value")
    sparsity = data["sparsity"]
    unknown = sorted(set(sparsity) - set(layers))
    if unknown:
        raise PrunellaError(
            f"allocation file {path} names {len(unknown)} layer(s) this model does not have, "
            f"e.g. {unknown[0]!r}"
        )
    missing = sorted(set(layers) - set(sparsity))
    if missing:
        raise PrunellaError(
            f"allocation file {path} gives no sparsity for {len(missing)} layer(s), "
            f"e.g. {missing[0]!r}"
        )
    for name, value in sparsity.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise PrunellaError(f"allocation file {path}: sparsity of {name!r} is not a number")
        try:
            check_sparsity(value)
        except PrunellaError:
            raise PrunellaError(
                f"allocation file {path}: sparsity of {name!r} must be in [0, 1), got {value}"
            ) from None
    file_target = data.get("target")
    if file_target is not None:
        try:
            file_target = check_sparsity(file_target)
        except PrunellaError:
            raise PrunellaError(
                f"allocation file {path}: target must be in [0, 1), got {file_target!r}"
            ) from None
    if target is None:
        target = file_target
    elif file_target is not None and abs(file_target - target) > 1e-9:
        raise PrunellaError(
            f"allocation file {path} is for target {file_target}, but --sparsity is {target}"
        )
    sizes = {name: rows * cols for name, (rows, cols) in layers.items()}
    total = sum(sizes.values())
    pruned = sum(round(sparsity[n] * sizes[n]) for n in layers)
    if target is None:
        target = pruned / total
    check_sparsity(target)
    if abs(pruned - target * total) > len(layers):
        raise PrunellaError(
            f"allocation file {path} prunes {pruned / total:.4%} of the weights, not the "
            f"target {target:.4%} (allowed: one weight per layer)"
        )
    for key in ("params", "metric"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise PrunellaError(f"allocation file {path}: {key!r} must be a mapping")
    nm = data.get("nm")
    if nm is not None:
        if not isinstance(nm, dict) or set(nm) != set(layers):
            raise PrunellaError(f"allocation file {path}: 'nm' must give N:M for every layer")
        for name, pair in nm.items():
            if not (
                isinstance(pair, list) and len(pair) == 2 and all(type(v) is int for v in pair)
            ):
                raise PrunellaError(f"allocation file {path}: 'nm' of {name!r} must be [N, M]")
            level = NM(*pair)
            if abs(level.sparsity - float(sparsity[name])) > 1e-6:
                raise PrunellaError(
                    f"allocation file {path}: {name!r} has nm {level} ({level.sparsity:.4g} "
                    f"sparse) but sparsity {sparsity[name]}"
                )
    rows = data.get("rows")
    if rows is not None:
        if nm is not None:
            raise PrunellaError(f"allocation file {path}: 'rows' and 'nm' exclude each other")
        if not isinstance(rows, dict) or set(rows) != set(layers):
            raise PrunellaError(f"allocation file {path}: 'rows' must give counts for every layer")
        for name, counts in rows.items():
            out, cols = layers[name]
            if not (
                isinstance(counts, list)
                and len(counts) == out
                and all(type(c) is int and 0 <= c <= cols for c in counts)
            ):
                raise PrunellaError(
                    f"allocation file {path}: 'rows' of {name!r} must be "
                    f"{out} counts in [0, {cols}]"
                )
            if abs(sum(counts) - float(sparsity[name]) * out * cols) > 0.5:
                raise PrunellaError(
                    f"allocation file {path}: the row counts of {name!r} do not add up to "
                    f"its sparsity {sparsity[name]}"
                )
    return Plan(
        target=target,
        sparsity={n: float(sparsity[n]) for n in layers},
        method=str(data.get("method", "file")),
        granularity=str(data.get("granularity", "layer")),
        params=dict(data.get("params") or {}),
        metric_name=str(data["metric_name"]) if data.get("metric_name") is not None else None,
        metric=dict(data.get("metric") or {}),
        nm=nm,
        rows=rows,
    )
