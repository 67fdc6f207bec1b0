"""ALPS: the layer-wise pruning problem solved by ADMM, then a PCG back-solve.

Meng, Behdin, Wang, Mazumder, "ALPS: Improved Optimization for Highly Sparse
One-Shot Pruning for Large Language Models", NeurIPS 2024. For one layer with
calibration inputs ``X`` and ``H = X^T X + lambda * mean(diag) * I`` (``lambda = 0.01``),
work in the variables scaled by ``s = sqrt(diag H)`` (so the Hessian has a unit
diagonal: ``Hn = S^-1 H S^-1``, ``B = W S``, ``B0`` the dense layer) and solve

    min_B  1/2 tr((B - B0) Hn (B - B0)^T)   s.t.  B satisfies the pattern

by ADMM on the split ``B = D`` with ``D`` in the pattern and dual ``V``:

    B <- (B0 Hn - V + rho D) (Hn + rho I)^-1
    D <- P(B + V / rho)                              (projection: keep the largest |.|)
    V <- V + rho (B - D)

Every 3 iterations the support change ``c`` of ``D`` (entries that switched
between zero and non-zero, over ``k``, the number of weights kept) sets the
penalty: ``rho *= 1.3`` if ``c/k > 0.1``, ``1.2`` if ``c/k > 0.005``, ``1.1`` while it
still moves, capped at ``1e6``; the loop stops once the support holds still after
``rho`` has grown (or ``c/k < 3e-4`` after 30 iterations, or 300 iterations). Before
``rho`` has ever grown it was too large: a support that still moves a little makes
it ``rho / 5`` and restarts the iterations from ``B0``, one that holds still makes it
``rho / 5`` and goes on. ``(Hn + rho I)^-1 = Q diag(1 / (L + rho)) Q^T`` is rebuilt from
one eigendecomposition of ``Hn`` whenever ``rho`` changes. The support of ``P(B)`` is
then fixed and the surviving weights are refitted by preconditioned conjugate
gradients (10 iterations, Jacobi preconditioner, which is the identity for the unit
diagonal) on ``B Hn = B0 Hn`` restricted to the support.

Defaults are the reference code's (``rho = 0.1``, 300 iterations, update every 3,
10 PCG steps). Where we differ:

* the projection honours every pattern: unstructured keeps the ``k`` largest over
  the whole matrix (as the paper), ``N:M`` the ``N`` largest per group, and per-row
  budgets (:class:`~prunella.methods.sparsity.patterns.RowBudget`) the largest of each row;
* the eigendecomposition (float64, as in the reference) is computed once per input and
  shared by the layers that read it (q/k/v, gate/up);
* weights of dead inputs (``H_jj = 0``) score 0 in the projection, so they are pruned
  first instead of keeping places that their dampened scale would give them;
* a layer is never silently worse than SparseGPT: SparseGPT's solution under the same
  pattern is computed too, and when its reconstruction error ``tr(dW H dW^T)`` is
  lower it is kept and the layer reports ``fallback``. Set ``fallback=false`` to skip it.

Each layer reports its iterations, the final support change ``c/k``, whether the
support converged, and the relative reconstruction error ``tr(dW H dW^T) / tr(W H W^T)``;
a layer that did not converge, or kept SparseGPT's solution, says so in a ``note``
(the report's ``notes``, printed by ``prunella prune``).
"""

from __future__ import annotations

import torch

from ...engine.stats import HESSIAN, LayerStats
from ...registry import Option
from . import sparsegpt
from .patterns import Pattern, pattern_count, pattern_mask

PAPER = (
    "Meng et al., ALPS: Improved Optimization for Highly Sparse One-Shot Pruning "
    "for Large Language Models, NeurIPS 2024"
)
NEEDS = frozenset({HESSIAN})
OPTIONS = (
    Option("rho", float, 0.1, "initial ADMM penalty", low=0.0, low_open=True),
    Option("max_iter", int, 300, "most ADMM iterations", low=1),
    Option("update_iter", int, 3, "iterations between penalty updates", low=1),
    Option("switch_iter", int, 30, "iterations before the support-change stop applies", low=0),
    Option("pcg_iter", int, 10, "conjugate-gradient steps of the back-solve", low=0),
    Option(
        "percdamp", float, 0.01, "dampening, as a fraction of mean diag(H)", low=0.0, low_open=True
    ),
    Option("fallback", bool, True, "keep SparseGPT's solution where it is better"),
)


def _eigen(stats: LayerStats, percdamp: float) -> tuple[torch.Tensor, ...]:
    """``s``, ``L, Q`` with ``Hn = Q diag(L) Q^T``, ``Hn``, and ``live`` (1 for inputs that
    are ever non-zero, else 0); once per shared input."""
    key = ("alps", percdamp)
    if key not in stats.derived:
        H = stats.hessian.double()
        live = (H.diagonal() > 0).float()
        H.diagonal().add_(percdamp * H.diagonal().mean())
        s = H.diagonal().clamp_min(0).sqrt() + 1e-8
        Hn = H / s.unsqueeze(0) / s.unsqueeze(1)
        L, Q = torch.linalg.eigh(Hn)
        stats.derived[key] = (s.float(), L.float(), Q.float(), Hn.float(), live)
    return stats.derived[key]


def project(Z: torch.Tensor, pattern: Pattern, live: torch.Tensor) -> torch.Tensor:
    """``P(Z)``: ``Z`` with the entries of smallest magnitude zeroed as ``pattern`` demands
    (those of dead inputs, ``live == 0``, first)."""
    return Z.masked_fill(pattern_mask(Z.abs() * live, pattern), 0.0)


def pcg(
    Hn: torch.Tensor, target: torch.Tensor, B: torch.Tensor, keep: torch.Tensor, steps: int
) -> torch.Tensor:
    """Conjugate gradients, row by row, on ``B Hn = target`` over the entries in ``keep``
    (the others stay zero), starting from ``B``."""
    R = (target - B @ Hn) * keep
    P = R.clone()
    rr = R.square().sum(1, keepdim=True)
    for _ in range(steps):
        AP = (P @ Hn) * keep
        alpha = rr / (P * AP).sum(1, keepdim=True).clamp_min(1e-30)
        B = B + alpha * P
        R = R - alpha * AP
        rr_new = R.square().sum(1, keepdim=True)
        P = R + rr_new / rr.clamp_min(1e-30) * P
        rr = rr_new
    return B * keep


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)`` with ``dW = W - W_hat``: the layer-wise loss, relative."""
    delta = dense - pruned
    ref = ((dense @ H) * dense).sum().item()
    return ((delta @ H) * delta).sum().item() / ref if ref > 0 else 0.0


def alps_admm(
    B0: torch.Tensor,
    G: torch.Tensor,
    L: torch.Tensor,
    Q: torch.Tensor,
    live: torch.Tensor,
    pattern: Pattern,
    *,
    rho: float,
    max_iter: int,
    update_iter: int,
    switch_iter: int,
) -> tuple[torch.Tensor, dict]:
    """The ADMM loop on scaled weights ``B0`` (``[out, in]``), ``G = B0 Hn`` and
    ``Hn = Q diag(L) Q^T``; returns the last ``B`` and the facts of the run."""
    k = max(B0.numel() - pattern_count(pattern, B0.shape), 1)  # weights kept
    D = D_init = project(B0, pattern, live)
    B, V = B0, torch.zeros_like(B0)
    support = D != 0
    grown, converged, change, it = False, False, 0.0, 0
    inverse = (Q / (L + rho)) @ Q.t()  # (Hn + rho I)^-1
    for it in range(1, max_iter + 1):
        B = (G - V + rho * D) @ inverse
        D = project(B + V / rho, pattern, live)
        V = V + rho * (B - D)
        if it % update_iter:
            continue
        new_support = D != 0
        moved = (new_support != support).sum().item()
        support, change = new_support, moved / k
        restarted = False
        if change > 0.1:
            rho, grown = rho * 1.3, True
        elif change > 0.005:
            rho, grown = rho * 1.2, True
        elif moved > 0:
            if grown:
                rho *= 1.1
            else:  # barely moving before rho ever grew: rho is too large; restart gentler
                rho /= 5
                B, D, V = B0, D_init, torch.zeros_like(B0)
                restarted = True
        elif grown:
            converged = True
            break
        else:  # frozen before rho ever grew: loosen it
            rho /= 5
        rho = min(rho, 1e6)
        inverse = (Q / (L + rho)) @ Q.t()
        if it > switch_iter and change < 3e-4 and not restarted:
            converged = True
            break
    return B, {
        "iterations": it,
        "support_change": change,
        "converged": converged,
        "rho": rho,
    }


def prune(
    weight: torch.Tensor,
    pattern: Pattern,
    stats: LayerStats,
    *,
    rho: float,
    max_iter: int,
    update_iter: int,
    switch_iter: int,
    pcg_iter: int,
    percdamp: float,
    fallback: bool,
) -> tuple[torch.Tensor, dict]:
    W = weight.float()
    if pattern_count(pattern, W.shape) == 0:
        return W, {"iterations": 0, "support_change": 0.0, "converged": True}
    s, L, Q, Hn, live = _eigen(stats, percdamp)
    B0 = W * s
    G = B0 @ Hn
    B, info = alps_admm(
        B0,
        G,
        L,
        Q,
        live,
        pattern,
        rho=rho,
        max_iter=max_iter,
        update_iter=update_iter,
        switch_iter=switch_iter,
    )
    pruned = pattern_mask(B.abs() * live, pattern)  # the support of P(B), fixed from now on
    B = pcg(Hn, G, B.masked_fill(pruned, 0.0), ~pruned, pcg_iter)
    new = B / s
    H = stats.hessian
    info["rel_recon_error"] = reconstruction_error(W, new, H)
    notes = [] if info["converged"] else [f"ADMM stopped at max_iter={max_iter} unconverged"]
    if fallback:
        defaults = {o.name: o.default for o in sparsegpt.OPTIONS}  # its blocksize
        other, _ = sparsegpt.prune(
            weight.clone(), pattern, stats, **defaults | {"percdamp": percdamp}
        )
        other_error = reconstruction_error(W, other, H)
        info["fallback"] = other_error < info["rel_recon_error"]
        if info["fallback"]:
            notes.append(
                f"kept SparseGPT's solution (reconstruction error {other_error:.3g} "
                f"< ALPS's {info['rel_recon_error']:.3g})"
            )
            new, info["rel_recon_error"] = other, other_error
    if notes:
        info["note"] = "; ".join(notes)
    return new, info
