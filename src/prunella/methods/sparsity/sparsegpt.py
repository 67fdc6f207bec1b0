"""SparseGPT: one-shot pruning with an approximate OBS weight update.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023. For the layer-wise problem
``min ||W X - W_hat X||^2`` with Hessian ``H = (2/n) X X^T``:

1. dampen: ``H += lambda * mean(diag(H)) * I`` with ``lambda = 0.01``;
2. take ``U``, the upper Cholesky factor of ``H^-1``;
3. sweep the columns in blocks of ``B = 128``: at the start of each block choose
   the mask from the OBS saliency ``w_ij^2 / U_jj^2`` (adaptive mask selection;
   for ``N:M`` every ``M`` columns), then for each column ``j`` zero the masked
   weights ``q`` and spread the error ``e = (w_j - q_j) / U_jj`` over the
   remaining columns of the block, ``W[:, j:] -= e U[j, j:]``;
4. after a block, apply its accumulated errors to all later columns at once
   (lazy batch update): ``W[:, end:] -= E U[block, end:]``.

Defaults are the paper's (block 128, dampening 1%). Where we differ from the
reference code:

* the unstructured budget is exact per layer: block ``b`` prunes
  ``round(k * end_b / cols) - round(k * start_b / cols)`` weights, with
  ``k = round(s * numel)``, instead of thresholding at a sorted index (which
  over-prunes on ties);
* weights of dead inputs (``H_jj = 0``, the feature is always zero) are scored 0,
  so they are pruned first and count towards the budget, instead of being zeroed
  on top of it;
* per-row budgets (:class:`~prunella.methods.sparsity.patterns.RowBudget`, from TRIM; the paper has
  none): row ``r``'s count ``c_r`` is split over the column blocks as its ``c_r`` lowest
  saliencies fall at the start, and each block then prunes that many of the row's
  weights by the saliency of the moment (the adaptive selection, one row at a time);
* if ``H`` is not positive definite after dampening (few tokens, collinear
  features), the dampening is multiplied by 10 until the Cholesky succeeds,
  and the value used is reported.

Joint sparsification and quantization (the paper's section 3.5, ``grid`` given): in the
same sweep, column ``j``'s kept weights are rounded to the grid, ``q_j = Q(w_j)`` where
unmasked and 0 where masked, and the whole error ``(w_j - q_j) / U_jj`` is spread over
the later columns, so that later masks and roundings see it. Each group's scale is
computed once from the weights before the sweep, as our GPTQ does (the reference
computes it when the sweep reaches the group).
"""

from __future__ import annotations

import torch

from ...engine.stats import HESSIAN, LayerStats
from ...registry import Option
from ..bits.grid import Grid, dequantize, kept_zero, qparams
from ..bits.grid import quantize as to_codes
from .patterns import NM, Pattern, RowBudget, lowest_k_mask, nm_mask, pruned_count, row_counts_mask

PAPER = (
    "Frantar & Alistarh, "
    "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot, ICML 2023"
)
NEEDS = frozenset({HESSIAN})
OPTIONS = (
    Option("blocksize", int, 128, "columns per block of the lazy batch update", low=1),
    Option("percdamp", float, 0.01, "dampening, as a fraction of mean diag(H)", low=0.0),
)


def inverse_hessian_cholesky(
    hessian: torch.Tensor, percdamp: float, max_tries: int = 8
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` and the dampening used."""
    base = percdamp * hessian.diagonal().mean().item()
    for attempt in range(max_tries):
        damp = base * 10**attempt
        h = hessian.clone()
        h.diagonal().add_(damp)
        lower, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            h_inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if info.item() == 0:
                return upper, damp / max(hessian.diagonal().mean().item(), 1e-30)
    raise RuntimeError(
        f"the Hessian stayed singular after dampening by {damp:.3g}: use more calibration tokens"
    )


def _factor(stats: LayerStats, percdamp: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``U``, the dampening and the dead-input mask; computed once per shared input."""
    key = ("sparsegpt", percdamp)
    if key not in stats.derived:
        H = stats.hessian
        dead = H.diagonal() == 0
        H[dead, dead] = 1.0
        U, damp = inverse_hessian_cholesky(H, percdamp)
        stats.derived[key] = (U, damp, dead)
    return stats.derived[key]


def prune(
    weight: torch.Tensor,
    pattern: Pattern,
    stats: LayerStats,
    *,
    blocksize: int,
    percdamp: float,
    grid: Grid | None = None,
) -> tuple[torch.Tensor, dict]:
    """The pruned weight (float32) and facts; with ``grid``, its kept weights quantized in
    the same sweep, and the facts hold the grid's ``scale`` and ``zero``."""
    # Work on W^T so that column j of W is the contiguous row Wt[j]: the column sweep then
    # touches contiguous memory, and each step is one multiply and one outer-product update.
    Wt = weight.float().t().contiguous()
    cols = Wt.shape[0]
    U, damp, dead = _factor(stats, percdamp)
    U_diag = U.diagonal()
    if grid is not None:  # every group's scale once, from the weights before the sweep
        Wt[dead] = 0.0
        fixed = kept_zero(Wt, grid)  # weights already zero (pruned by another solver)
        grid_scale, grid_zero = qparams(Wt.t(), grid)
        St = grid_scale.t().repeat_interleave(grid.group, 0).contiguous()  # row j: column j's
        Zt = grid_zero.t().float().repeat_interleave(grid.group, 0).contiguous()

    nm = pattern if isinstance(pattern, NM) else None
    if nm is not None:
        if cols % nm.m:
            nm_mask(Wt[:, :1].t(), nm.n, nm.m)  # raises the one-line error
        blocksize = max(nm.m, blocksize - blocksize % nm.m)
    k_total = 0 if nm else pruned_count(Wt.numel(), pattern.sparsity)

    def saliency(i1: int, i2: int) -> torch.Tensor:
        """OBS saliency ``w^2 / U_jj^2`` of columns ``i1:i2`` (transposed), dead inputs 0."""
        s = Wt[i1:i2].square() / U_diag[i1:i2].square().unsqueeze(1)
        return s.masked_fill(dead[i1:i2].unsqueeze(1), 0.0)

    row_split = None  # where each row's budget falls, by the saliencies at the start
    if isinstance(pattern, RowBudget):
        row_split = row_counts_mask(saliency(0, cols).t(), pattern.counts.to(Wt.device))

    pruned_so_far = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]  # W1 is a view: updated in place
        err = torch.empty_like(W1)
        if row_split is not None:
            mask1 = row_counts_mask(saliency(i1, i2).t(), row_split[:, i1:i2].sum(1)).t()
        elif nm is None:
            k_block = round(k_total * i2 / cols) - pruned_so_far
            pruned_so_far += k_block
            mask1 = lowest_k_mask(saliency(i1, i2), k_block)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        scale = mask1 / U1.diagonal().unsqueeze(1)  # err_j = (w_j - q_j) / U_jj
        for i in range(i2 - i1):
            if nm is not None and i % nm.m == 0:
                j = i1 + i
                group = nm_mask(saliency(j, j + nm.m).t(), nm.n, nm.m).t()
                mask1[i : i + nm.m] = group
                scale[i : i + nm.m] = group / U1.diagonal()[i : i + nm.m].unsqueeze(1)
            if grid is None:
                torch.mul(W1[i], scale[i], out=err[i])
            else:  # q_j: the kept weights on the grid, the masked ones 0
                j = i1 + i
                q = dequantize(to_codes(W1[i], St[j], Zt[j], grid), St[j], Zt[j], grid)
                q.masked_fill_(mask1[i] | fixed[j], 0.0)
                torch.div(W1[i] - q, U1[i, i], out=err[i])
            W1[i:].addr_(U1[i, i:], err[i], alpha=-1.0)  # W[:, j:] -= err_j U[j, j:]
            if grid is not None:
                W1[i] = q
        W1.masked_fill_(mask1, 0.0)  # exact zeros where pruned
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), err, alpha=-1.0)  # lazy batch update
    facts = {"damp": damp, "damp_raised": damp > percdamp * 1.0000001}
    if grid is not None:
        facts |= {"scale": grid_scale, "zero": grid_zero}
    return Wt.t(), facts
