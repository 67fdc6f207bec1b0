"""Expert usage: in a mixture of experts, the experts the router uses least lose the most.

Prunella's own method (no paper defines it; the idea, that rarely routed experts
matter less, is the premise of expert pruning work such as HEAPr's and of
frequency-based expert dropping).

Metric: on the dense model and the calibration windows, expert ``e`` receives
``f_e`` tokens from its router (routing frequency) with router weights summing to
``m_e`` (router weight mass). Its usage is their geometric mean,
``u_e = sqrt(f_e * m_e)``: an expert chosen often but with small weights counts
for less than one chosen as often with large weights.

Mapping: relative usage ``r_e = u_e / mean(u)`` over all experts, and
``s_e = target + lambda * clip(1 - r_e, -1, 1)`` (option ``spread``): an unused expert is
pruned at ``target + lambda``, one used twice as much as the average at ``target - lambda``.
Units that are not experts (attention, shared experts, dense blocks) stay at the
target; the plan layer then makes the budget exact. ``lambda = 0.1`` is ours.

Use it with ``--granularity expert`` (one sparsity per expert, the rest of each
block one unit) or ``layer``. With ``block``, a block's metric is the mean usage
of its experts, the same for every block whose tokens all go to ``top_k`` experts,
so the allocation is uniform.
"""

from __future__ import annotations

import math

import torch

from ...engine.stats import COL_NORMS
from ...registry import Option
from .run import AllocationRun, Scores

PAPER = "Prunella: experts pruned by their routing frequency and router weight mass"
NEEDS = frozenset({COL_NORMS})  # any statistic: the routed token counts come with it
OPTIONS = (
    Option(
        "spread",
        float,
        0.1,
        "expert ratios stay within target +- spread",
        low=0.0,
        high=1.0,
        high_open=True,
        old=("lam",),
    ),
)
METRIC = "expert_usage"


def expert_usage(tokens: int, routed_weight: float) -> float:
    """``sqrt(f * m)``: routed tokens times their summed router weights."""
    return math.sqrt(tokens * routed_weight)


def unit_usage(layers: list[tuple[torch.Tensor, object]]) -> float:
    """The mean usage of the experts' inputs in the unit (NaN when it holds no expert)."""
    inputs = {id(s): s for _, s in layers if s is not None and s.routed_weight is not None}
    if not inputs:
        return float("nan")
    return sum(expert_usage(s.tokens, s.routed_weight) for s in inputs.values()) / len(inputs)


def allocate(run: AllocationRun, **_) -> Scores:
    return Scores(run.per_unit(unit_usage))


def ratios(metric: torch.Tensor, target: float, *, spread: float, **_) -> torch.Tensor:
    """``target + spread * clip(1 - u / mean(u), -1, 1)`` for experts, ``target`` for the rest."""
    out = torch.full_like(metric, target)
    experts = ~torch.isnan(metric)
    if experts.any() and metric[experts].mean() > 0:
        relative = metric[experts] / metric[experts].mean()
        out[experts] = target + spread * (1 - relative).clamp(-1, 1)
    return out
