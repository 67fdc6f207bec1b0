"""GPTQ: one-shot weight quantization with column-by-column error feedback.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023. For the layer-wise problem
``min ||W X - W_hat X||^2`` with Hessian ``H = (2/n) X X^T``:

1. dampen ``H += lambda mean(diag H) I`` (``lambda = 0.01``); inputs that are always
   zero (``H_jj = 0``) get ``H_jj = 1`` and their weights zeroed;
2. with act-order, visit the columns by decreasing ``H_jj``;
3. take ``U``, the upper Cholesky factor of ``H^-1`` (in the visiting order);
4. sweep the columns in blocks of ``B = 128``: quantize column ``j`` to ``q_j``, and
   spread its error ``e = (w_j - q_j) / U_jj`` over the block's later columns,
   ``W[:, j:] -= e U[j, j:]``; after a block, apply its errors to all later columns at
   once (lazy batch update).

Defaults are those of llm-compressor's ``GPTQModifier`` (block 128, dampening 1%,
``actorder="static"``), the tool people use, which differ from the reference code in
two ways that we follow: the columns are visited in act-order by default, and every
group's scale and zero point are computed once, from the weights before the sweep,
in the original column order (so no group index needs to be stored). The reference
code computes each group's parameters when the sweep reaches the group, from the
updated weights.

Where we differ from both: composed with sparsity (the sparsity axis runs first), a
weight that is exactly zero stays zero: its column step quantizes it to zero and feeds
back that error, as SparseGPT's joint sparsification and quantization does (not on
GGML's grids with a minimum per block, ``q4_1``/``q5_1``, which may hold no zero: there
sparsity is refused). If ``H``
is not positive definite after dampening, the dampening is multiplied by 10 until
the Cholesky succeeds (llm-compressor falls back to round to nearest), and the value
used is reported.
"""

from __future__ import annotations

import torch

from ...engine.stats import HESSIAN, LayerStats
from ...registry import Option
from ..sparsity.sparsegpt import inverse_hessian_cholesky
from .grid import OBSERVER, Grid, dequantize, kept_zero, qparams
from .grid import quantize as to_codes

PAPER = (
    "Frantar et al., GPTQ: Accurate Post-Training Quantization for Generative Pre-trained "
    "Transformers, ICLR 2023"
)
NEEDS = frozenset({HESSIAN})
OPTIONS = (
    Option("blocksize", int, 128, "columns per block of the lazy batch update", low=1),
    Option("percdamp", float, 0.01, "dampening, as a fraction of mean diag(H)", low=0.0),
    Option("actorder", bool, True, "visit the columns by decreasing Hessian diagonal"),
    OBSERVER,
)


def _factor(stats: LayerStats, percdamp: float, actorder: bool):
    """The visiting order, ``U`` in that order, the dampening and the dead inputs; once
    per shared input (q, k and v share theirs)."""
    key = ("gptq", percdamp, actorder)
    if key not in stats.derived:
        H = stats.hessian.clone()
        dead = H.diagonal() == 0
        H[dead, dead] = 1.0
        order = (
            torch.argsort(H.diagonal(), descending=True, stable=True)
            if actorder
            else torch.arange(H.shape[0], device=H.device)
        )
        U, damp = inverse_hessian_cholesky(H[order][:, order], percdamp)
        stats.derived[key] = (order, U, damp, dead)
    return stats.derived[key]


def quantize(
    weight: torch.Tensor,
    grid: Grid,
    stats: LayerStats,
    *,
    blocksize: int,
    percdamp: float,
    actorder: bool,
    observer: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The quantized weight (float32), its scales and zero points, and facts."""
    order, U, damp, dead = _factor(stats, percdamp, actorder)
    W = weight.float().clone()
    W[:, dead] = 0.0
    zeros = kept_zero(W, grid)  # pruned weights stay exactly zero
    scale, zero = qparams(W, grid, observer)  # once, from the weights before the sweep
    # Work on the visiting order, transposed: column j of W is the contiguous row Wt[j].
    Wt, Zt = W[:, order].t().contiguous(), zeros[:, order].t().contiguous()
    group = order // grid.group
    St, Qt = scale.t()[group].contiguous(), zero.t()[group].float().contiguous()
    cols = Wt.shape[0]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]  # a view: updated in place
        err = torch.empty_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[i].clone()
            q = dequantize(to_codes(w, St[j], Qt[j], grid), St[j], Qt[j], grid)
            q.masked_fill_(Zt[j], 0.0)
            torch.div(w - q, U1[i, i], out=err[i])
            W1[i:].addr_(U1[i, i:], err[i], alpha=-1.0)  # W[:, j:] -= err_j U[j, j:]
            W1[i] = q
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), err, alpha=-1.0)  # lazy batch update
    out = torch.empty_like(W)
    out[:, order] = Wt.t()
    return out, scale, zero, {"damp": damp, "damp_raised": damp > percdamp * 1.0000001}
