"""Lua-LLM: per-row sparsity thresholds learned through a soft top-k mask.

"Lua-LLM: Learning Unstructured-Sparsity Allocation for Large Language Models",
NeurIPS 2025 (minggeOvO/Lua-LLM: ``models/masked_layers.py``, ``lua_llama.py``).

Importance. Wanda's scores ``A_ij = |W_ij| ||X_j||_2`` on the dense model, replaced
within each row by their empirical CDF ``s_ij = rank_j(A_ij) / C_in`` in
``(0, 1]`` (the rank from 1).

Soft top-k. Each output row ``j`` of every prunable matrix has one learned
threshold ``t_j``, the row's sparsity; the mask

    m_ij = sigmoid(C_in (s_ij - t_j))

keeps the weights whose rank is above ``t_j C_in`` (the temperature ``1 / C_in``
makes one rank step one unit of the logit).

Objective. The model runs with ``W ⊙ m``; with the density ``R = sum round(m) / N``
(straight-through: the forward counts the hard mask, the gradient is the soft
one's) and the target density ``p = 1 - target``,

    L = CE(W ⊙ m) + lam |log(R / p)|,     lam = 16 (option ``penalty``),

minimised over the thresholds only (the model is frozen) by AdamW (``lr = 5e-3``,
weight decay 0.05, no schedule: the authors' LLaMA-7B script) for ``steps = 500``
steps of one calibration window each (the paper: batch 1 of 2048 tokens), the
thresholds starting at the target (the paper's Algorithm 1).

Allocation. The learned ``t_j`` are the raw per-row sparsities; one shift and the
rounding of :func:`~prunella.methods.plan.fit_budget` make them whole counts
whose total is exactly the target, and each layer's share is its rows' sum. With
an unstructured target the plan carries the per-row budgets (any solver honours
them, as it does TRIM's); with N:M it mixes levels from the layers' learned means.

How it runs. ``dCE/dt_j = -C_in sum_i G_ij W_ij m_ij (1 - m_ij)`` with ``G = dCE/d(W ⊙ m)``
from a block-by-block backward (:func:`~prunella.engine.gradients.block_gradients`),
so the memory is one block's activations, the int16 ranks (half a float32 model)
and the thresholds. Where we differ: the paper learns on WikiText-103 for 500 steps
on two GPUs; here the user's calibration windows are cycled through
(``crop`` crops them, 0: whole windows), in float32. ``--granularity`` does not
apply: the allocation is per row.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ...engine.forward import visit_blocks
from ...engine.gradients import block_gradients
from ...engine.stats import COL_NORMS, LOSS, WEIGHTS
from ...errors import PrunellaError
from ...registry import Option
from ..plan import fit_budget
from ..sparsity.patterns import NM
from ..sparsity.wanda import wanda_scores
from .run import AllocationRun, Assignment

PAPER = "Lua-LLM: Learning Unstructured-Sparsity Allocation for Large Language Models, NeurIPS 2025"
NEEDS = frozenset({LOSS, COL_NORMS, WEIGHTS})
OPTIONS = (
    Option("steps", int, 500, "optimisation steps, one calibration window each", low=1),
    Option("lr", float, 5e-3, "AdamW learning rate of the thresholds", low=0.0, low_open=True),
    Option("weight_decay", float, 0.05, "AdamW weight decay", low=0.0),
    Option(
        "penalty",
        float,
        16.0,
        "weight lam of the budget penalty lam |log(R / p)|",
        low=0.0,
        old=("lam",),
    ),
    Option(
        "crop",
        int,
        0,
        "learn on the first tokens of each window only (0: all)",
        low=0,
        old=("seqlen",),
    ),
)
METRIC = "learned_sparsity"


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Within each row, the rank of every score from 1 (smallest) to ``C_in``, as int16
    (int32 for rows longer than 32767)."""
    dtype = torch.int16 if scores.shape[1] < 2**15 else torch.int32
    return (scores.argsort(dim=1, stable=True).argsort(dim=1) + 1).to(dtype)


def soft_mask(ranks: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``m_ij = sigmoid(C_in (s_ij - t_j))`` with ``s_ij = rank / C_in``."""
    cols = ranks.shape[1]
    return torch.sigmoid(ranks.float() - cols * t.to(ranks.device)[:, None])


def hard_kept(t: torch.Tensor, cols: int) -> torch.Tensor:
    """Weights each row keeps with the hard mask ``round(m)``: ranks above ``t C_in``."""
    return (cols - torch.floor(t * cols)).clamp(0, cols)


def budget_penalty(t: dict[str, torch.Tensor], cols: dict[str, int], total: int, density: float,
                   lam: float) -> tuple[float, float, float]:  # fmt: skip
    """``(R, lam |log(R / p)|, dP/dR)`` at the thresholds ``t``."""
    kept = sum(hard_kept(t[n], cols[n]).sum().item() for n in t)
    r = max(kept / total, 1e-12)
    return r, lam * abs(math.log(r / density)), lam * math.copysign(1.0, r - density) / r


def ce_threshold_grads(
    store, ids: torch.Tensor, ranks: dict, t: dict, *, device: torch.device
) -> dict[str, torch.Tensor]:
    """``dCE/dt`` of the model running ``W ⊙ m(t)`` on windows ``ids``: with
    ``G = dCE/d(W ⊙ m)`` one block at a time, ``W dm/dt = -C_in (W ⊙ m)(1 - m)``."""
    running: dict[str, torch.Tensor] = {}  # W ⊙ m of the block being run
    blocks_path = store.adapter.blocks_path

    def masked(name: str, weight: torch.Tensor) -> torch.Tensor:
        block = name[: name.index(".", len(blocks_path) + 1)]
        if not all(key.startswith(block + ".") for key in running):
            running.clear()  # a new block: one block's masked weights at a time
        running[name] = weight.float() * soft_mask(ranks[name], t[name]).to(weight.device)
        return running[name]

    grads = {}
    for _, block_grads in block_gradients(store, ids, device=device, weight_of=masked):
        for name, g in block_grads.items():
            m = soft_mask(ranks[name], t[name])
            cols = ranks[name].shape[1]
            grads[name] = -cols * (g.sum(0) * running[name].cpu() * (1 - m)).sum(1)
    return grads


def allocate(
    run: AllocationRun, *, steps: int, lr: float, weight_decay: float, penalty: float,
    crop: int, **_,
) -> Assignment:  # fmt: skip
    """The per-row allocation Lua-LLM learns on ``run``'s calibration windows."""
    store, budget = run.store, run.budget()
    target = budget.target
    windows = run.windows[:, :crop] if crop else run.windows
    if windows.shape[1] < 2:
        raise PrunellaError("lua option crop must be 0 or at least 2")
    ranks: dict[str, torch.Tensor] = {}

    def visit(prefix: str, layers: dict) -> None:
        for name, (weight, stats) in layers.items():
            ranks[name] = row_ranks(wanda_scores(weight.float(), stats.col_norms)).cpu()

    visit_blocks(
        store, visit, needs=frozenset({COL_NORMS}), windows=run.windows, device=run.device,
        dtype=run.dtype, batch_size=run.batch_size, progress=run.progress,
        desc="lua (importance)",
    )  # fmt: skip
    cols = {n: r.shape[1] for n, r in ranks.items()}
    total = sum(r.numel() for r in ranks.values())
    t = {n: torch.full((r.shape[0],), float(target)) for n, r in ranks.items()}
    optimizer = torch.optim.AdamW(list(t.values()), lr=lr, weight_decay=weight_decay)
    curve = []
    bar = tqdm(range(steps), desc="lua (learning)", unit="step", disable=not run.progress)
    for step in bar:
        ids = windows[step % len(windows)][None]
        density, cost, d_cost = budget_penalty(t, cols, total, 1 - target, penalty)
        grads = ce_threshold_grads(store, ids, ranks, t, device=run.device)
        for name in grads:  # + dP/dR dR/dt, dR/dt_j = sum_i dm_ij/dt_j / N
            m = soft_mask(ranks[name], t[name])
            grads[name] += d_cost * (-cols[name] * m * (1 - m)).sum(1) / total
        for name, value in t.items():
            value.grad = grads[name]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append([step, density, cost])
        bar.set_postfix(density=f"{density:.4f}")
    return lua_assignment(run, t, cols, curve)


def lua_assignment(
    run: AllocationRun, t: dict[str, torch.Tensor], cols: dict[str, int], curve: list
) -> Assignment:
    """Learned thresholds as exact per-row counts (unstructured), or N:M levels from each
    layer's mean."""
    budget = run.budget()
    target, lo, hi = budget.target, budget.lo, budget.hi
    names = list(t)
    raw = torch.cat([t[n].detach().clamp(0, 1) for n in names])
    sizes = torch.cat([torch.full_like(t[n], cols[n]) for n in names])
    learned = {n: t[n].detach().clamp(0, 1).mean().item() for n in names}
    result = Assignment(
        budget.axis, {}, granularity="layer", metric_name=METRIC, metric=learned,
        facts={"curve": curve[-1:]},
    )  # fmt: skip
    if isinstance(budget.spec, NM):  # N:M levels from the layers' learned means
        axis = run.axes.get(budget.axis)
        result.values, result.detail = axis.fit(learned, run.store.layers(), budget)
        return result
    fitted = fit_budget(raw, sizes, target, lo, hi)
    counts = (fitted * sizes).round().long()
    rows, start = {}, 0
    for n in names:
        row_counts = counts[start : start + len(t[n])]
        start += len(t[n])
        rows[n] = row_counts.tolist()
        result.values[n] = row_counts.sum().item() / (len(row_counts) * cols[n])
    result.detail["rows"] = rows
    return result
