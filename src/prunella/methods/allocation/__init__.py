"""Sparsity allocation: how much each block, or each layer, loses.

An allocation method is one module (see :mod:`prunella.registry`): ``NEEDS``
says what it reads (nothing but shapes, the weights, or calibration statistics
of the dense model), ``unit_metric`` scores a unit (a block, or one layer with
``granularity="layer"``) and ``sparsities`` maps the scores to raw sparsities
around the target; :mod:`prunella.allocation.plan` makes the budget exact.
Third-party methods register through the ``prunella.allocations`` entry point
group.
"""

from __future__ import annotations

import torch

from ...engine.forward import visit_blocks
from ...engine.stats import WEIGHTS
from ...errors import PrunellaError
from ...registry import Method, Registry
from ..sparsity.patterns import Pattern
from . import (
    alphapruning,
    dsa,
    ecoflap,
    erk,
    evopress,
    expert_usage,
    layerif,
    lua,
    owl,
    tpe,
    uniform,
)
from .plan import (
    GRANULARITIES,
    Plan,
    allocation_units,
    build_plan,
    fit_budget,
    fit_nm_levels,
    load_plan,
)

ALLOCATIONS = Registry(
    "allocation",
    "prunella.allocations",
    {
        "uniform": uniform,
        "owl": owl,
        "alphapruning": alphapruning,
        "erk": erk,
        "evopress": evopress,
        "tpe": tpe,
        "dsa": dsa,
        "expert_usage": expert_usage,
        "ecoflap": ecoflap,
        "layerif": layerif,
        "lua": lua,
    },
    hooks=(
        ("METRIC", "unit_metric", "sparsities"),
        ("METRIC", "model_metric", "sparsities"),
        ("search",),
    ),
)

__all__ = [
    "ALLOCATIONS",
    "GRANULARITIES",
    "Plan",
    "allocate",
    "build_plan",
    "fit_budget",
    "fit_nm_levels",
    "get_method",
    "load_plan",
]


def get_method(name: str) -> Method:
    return ALLOCATIONS.get(name)


def allocate(
    store,
    method: Method,
    options: dict,
    pattern: Pattern,
    *,
    windows: torch.Tensor | None = None,
    granularity: str = "block",
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.99,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    progress: bool = True,
    solver: Method | None = None,
    solver_options: dict | None = None,
) -> Plan:
    """A :class:`Plan` for ``pattern``'s target by allocation ``method`` (options resolved).

    Methods that need calibration statistics run one dense forward pass over
    ``windows``; methods that read the weights visit every block without a
    forward pass; methods that need only shapes read nothing. A search method
    (:mod:`prunella.search`) scores candidates pruned by ``solver``.
    """
    if granularity not in GRANULARITIES:
        raise PrunellaError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not 0.0 <= min_sparsity <= max_sparsity < 1.0:
        raise PrunellaError(
            f"need 0 <= min sparsity <= max sparsity < 1, got {min_sparsity}, {max_sparsity}"
        )
    sizes = {name: rows * cols for name, (rows, cols) in store.layers().items()}
    if hasattr(method.module, "search") or hasattr(method.module, "model_metric"):
        from ..search import SearchRun
        from ..sparsity import get_solver

        run = SearchRun(
            store, windows, pattern, solver or get_solver("sparsegpt"), solver_options or {},
            granularity, min_sparsity, max_sparsity, device, dtype, batch_size, progress, method,
        )  # fmt: skip
        if hasattr(method.module, "search"):
            return method.search(run, **options)
        metric = method.model_metric(run, **options)
        return build_plan(
            method, metric, run.units, sizes, pattern.sparsity, pattern, granularity, options,
            min_sparsity, max_sparsity,
        )  # fmt: skip
    statistics = method.needs - {WEIGHTS}
    if statistics and windows is None:
        raise PrunellaError(f"allocation {method.name!r} needs calibration data")
    metric = {}
    units: dict[str, list[str]] = {}
    blocks_path = store.adapter.blocks_path

    def visit(prefix: str, block_layers: dict) -> None:
        block_units = allocation_units(list(block_layers), blocks_path, granularity)
        for unit, names in block_units.items():
            units[unit] = names
            metric[unit] = method.unit_metric([block_layers[n] for n in names], **options)

    visit_blocks(
        store,
        visit,
        needs=statistics,
        read=bool(method.needs),
        windows=windows,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        progress=progress,
        desc=f"allocation ({method.name})",
    )
    return build_plan(
        method,
        metric,
        units,
        sizes,
        pattern.sparsity,
        pattern,
        granularity,
        options,
        min_sparsity,
        max_sparsity,
    )
