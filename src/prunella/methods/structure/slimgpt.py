"""Structured Optimal Brain Surgeon for the consumer of a cut: which input columns of
``down_proj`` (MLP channels) or ``o_proj`` (KV groups) to remove, and the kept columns
refit to make up for them.

Ling et al., "SlimGPT: Layer-wise Structured Pruning for Large Language Models"
(NeurIPS 2024), after ZipLM (Kurtic et al., NeurIPS 2023). For a layer ``W``
(``[out, in]``) with input Gram matrix ``H = sum_t x_t x_t^T`` (dampened by 1% of its
mean diagonal, the paper's ``percdamp``), removing the group ``G`` of columns costs

    E_G = trace( W_G (H^-1_GG)^-1 W_G^T )

and is made up for by ``W <- W - W_G (H^-1_GG)^-1 H^-1_G,:``. Groups are removed
greedily, cheapest first, ``H^-1`` updated by its Schur complement after every step.
Sequential OBS with exact updates ends at the least-squares optimum of the final kept
set, so the kept weights are

    W'_K = W H_:,K (H_KK)^-1          (:func:`refit`)

which :func:`removal_order` does not need to carry: it returns the order, and any width
is then one refit. Differences from the paper: MLP channels are removed
``ceil(removed / 64)`` at a time (SlimGPT grows the step with its "dynamic group size";
a fixed number of steps bounds the cost at ``O(in^2 removed)``); and ``H`` comes from
one pass of the dense model over the calibration windows rather than from the
already-cut blocks before it, so that every candidate structure of a search reuses it.
"""

from __future__ import annotations

import math

import torch

PAPER = "Ling et al., SlimGPT: Layer-wise Structured Pruning for LLMs (NeurIPS 2024)"
PERCDAMP = 0.01
STEPS = 64


def damped(hessian: torch.Tensor, percdamp: float = PERCDAMP) -> torch.Tensor:
    """``H + percdamp * mean(diag H) * I`` in float64 (a dead column's diagonal set to 1)."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(percdamp * torch.diagonal(h).mean())
    return h


def removal_order(
    weight: torch.Tensor, hessian: torch.Tensor, group: int, stop: int, steps: int = STEPS
) -> list[int]:
    """Units (groups of ``group`` consecutive input columns) in the order OBS removes
    them, until ``stop`` units remain."""
    w = weight.double()
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(damped(hessian)))
    alive = torch.arange(w.shape[1] // group)
    step = max(1, math.ceil((len(alive) - stop) / steps)) if group == 1 else 1
    order: list[int] = []
    while len(alive) > stop:
        a = len(alive)
        if group == 1:
            scores = (w**2).sum(0) / torch.diagonal(h_inv)
        else:
            idx = torch.arange(a)
            blocks = h_inv.reshape(a, group, a, group)[idx, :, idx, :]
            wg = w.reshape(w.shape[0], a, group).transpose(0, 1)
            scores = torch.einsum("aog,agh,aoh->a", wg, torch.linalg.inv(blocks), wg)
        n = min(step, a - stop)
        drop = torch.sort(torch.argsort(scores, stable=True)[:n]).values
        gone = torch.zeros(a, dtype=torch.bool)
        gone[drop] = True
        cols = gone.repeat_interleave(group)
        r, k = cols.nonzero().squeeze(1), (~cols).nonzero().squeeze(1)
        solve = torch.linalg.solve(h_inv[r][:, r], h_inv[r][:, k])  # (H^-1_RR)^-1 H^-1_RK
        w = w[:, k] - w[:, r] @ solve
        h_inv = h_inv[k][:, k] - h_inv[k][:, r] @ solve
        order += alive[drop].tolist()
        alive = alive[~gone]
    return order


def refit(
    weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, percdamp: float = PERCDAMP
) -> torch.Tensor:
    """``W (H + l I)_:,K ((H + l I)_KK)^-1``: the kept columns ``keep`` of ``weight`` that
    best reproduce its output on the calibration inputs, the dampening ``l`` a ridge that
    pulls them towards ``W_K`` (float32)."""
    h = damped(hessian, percdamp)
    chol = torch.linalg.cholesky(h[keep][:, keep])
    return torch.cholesky_solve((weight.double() @ h[:, keep]).T, chol).T.float()
