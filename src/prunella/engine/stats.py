"""Layer statistics gathered from calibration activations during capture.

For a linear layer with inputs ``X`` (``[tokens, in_features]``, all calibration
windows stacked) the solvers need at most:

* ``hessian``   -- ``H = (2 / n) X^T X`` in float32, the SparseGPT / OBS Hessian of
  the layer-wise squared error (``n`` = number of tokens).
* ``col_norms`` -- ``||X_j||_2`` per input feature ``j``, Wanda's activation norm.
  When the Hessian is gathered too it comes for free: ``||X_j||^2 = (n / 2) H_jj``.

Layers that read the same tensor (``q/k/v_proj``, ``gate/up_proj``) share one
:class:`LayerStats` object, so each Hessian is accumulated once per input, not
once per layer. Accumulation is in place (``addmm_``), one pass per batch, and
fills only the lower triangle of the symmetric ``X^T X``, in row blocks of
:data:`ROWS` (BLAS's ``syrk`` idea, about 40% less arithmetic than the full
product); the upper triangle is mirrored once, when the Hessian is read.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable

import torch
from torch import nn

HESSIAN = "hessian"
COL_NORMS = "col_norms"
STATISTICS = frozenset({HESSIAN, COL_NORMS})  # what a forward pass gathers per layer
# Not statistics: what else a method may need. WEIGHTS: the weights' values, not only
# their shapes (a streamed model's blocks are read for it); LOSS: the whole model's loss
# (ecoflap, layerif, lua); FITNESS: the KL to the dense model (the searches); HIDDEN:
# the hidden states entering and leaving each block (lwq). All but WEIGHTS need
# calibration data.
WEIGHTS = "weights"
LOSS = "loss"
FITNESS = "fitness"
HIDDEN = "hidden"
ROWS = 256  # row block of the lower-triangular accumulation
TOKENS = 1024  # input rows per accumulation step


def exact(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Switch autocast off for maths on ``x``'s device (statistics, solvers, errors)."""
    return torch.autocast(x.device.type, enabled=False)


class LayerStats:
    """Running sums over the inputs of one linear layer."""

    def __init__(self, in_features: int, needs: Iterable[str], device: torch.device) -> None:
        needs = set(needs)
        self.tokens = 0
        # an expert's input: the router's weights summed over its tokens (else None)
        self.routed_weight: float | None = None
        self._mirrored = True  # False while only the lower triangle of xtx is up to date
        # Quantities a solver derives from the sums (e.g. SparseGPT's inverse-Hessian
        # factor), kept here so layers that share this input compute them once.
        self.derived: dict = {}
        self.xtx = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
            if HESSIAN in needs
            else None
        )
        self.sq_sum = (
            torch.zeros(in_features, dtype=torch.float32, device=device)
            if COL_NORMS in needs and self.xtx is None
            else None
        )

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.tokens += x.shape[0]
        # In chunks of TOKENS rows: the float32 temporaries stay a few MiB whatever the
        # batch, and the heap reuses them instead of fragmenting around large ones.
        for chunk in x.split(TOKENS):
            if self.xtx is not None:
                # X^T in float32, contiguous (the GEMMs run ~20% faster): one copy that
                # transposes and casts (the forward may run in bfloat16)
                xt = torch.empty(
                    chunk.shape[1], chunk.shape[0], dtype=torch.float32, device=chunk.device
                )
                xt.copy_(chunk.t())
                for i in range(0, xt.shape[0], ROWS):  # rows i:i+ROWS, columns to the diagonal
                    self.xtx[i : i + ROWS, : i + ROWS].addmm_(xt[i : i + ROWS], xt[: i + ROWS].t())
            if self.sq_sum is not None:
                self.sq_sum.add_(chunk.float().square().sum(0))
        if self.xtx is not None:
            self._mirrored = False

    def finite(self) -> bool:
        """Whether the sums are finite: a NaN or Inf input carries into them, and so
        does an input too large to square in float32."""
        return all(torch.isfinite(s).all() for s in (self.xtx, self.sq_sum) if s is not None)

    @property
    def hessian(self) -> torch.Tensor:
        """``H = (2 / n) X^T X`` (float32)."""
        if self.xtx is None:
            raise RuntimeError("the Hessian was not gathered for this layer")
        if not self._mirrored:
            self.xtx.copy_(self.xtx.tril() + self.xtx.tril(-1).t())
            self._mirrored = True
        return self.xtx * (2.0 / max(self.tokens, 1))

    @property
    def col_norms(self) -> torch.Tensor:
        """``||X_j||_2`` for every input feature ``j`` (float32)."""
        sq = self.xtx.diagonal() if self.xtx is not None else self.sq_sum
        if sq is None:
            raise RuntimeError("activation norms were not gathered for this layer")
        return sq.clamp_min(0).sqrt()


class StatsCollector:
    """Forward pre-hooks that feed each linear layer's input into its :class:`LayerStats`.

    Use as a context manager around the forward passes of one block. Layers whose
    hooks see the very same input tensor object share one statistics object (found
    through weak references, so no activation is kept alive).
    """

    def __init__(self, linears: dict[str, nn.Module], needs: Iterable[str]) -> None:
        self.needs = frozenset(needs) - {WEIGHTS}
        unknown = self.needs - STATISTICS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STATISTICS)}")
        self.linears = linears
        self.stats: dict[str, LayerStats] = {}
        self._seen: dict[int, tuple[weakref.ref, LayerStats]] = {}
        self._handles: list = []

    def collect(self, name: str, x: torch.Tensor, routed_weight: float | None = None) -> LayerStats:
        """Accumulate ``x``, the input of layer ``name``, unless it was already accumulated
        (with, for an expert, the router's weights summed over its tokens)."""
        ref, seen = self._seen.get(id(x), (None, None))
        already = ref is not None and ref() is x  # this input was accumulated before
        if already and self.stats.setdefault(name, seen) is seen:
            return seen
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = LayerStats(x.shape[-1], self.needs, x.device)
        with exact(x):  # the sums stay float32 under an autocast forward
            stats.add(x)
        if routed_weight is not None:
            stats.routed_weight = (stats.routed_weight or 0.0) + routed_weight
        self._seen = {k: v for k, v in self._seen.items() if v[0]() is not None}
        self._seen[id(x)] = (weakref.ref(x), stats)
        return stats

    def _hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            self.collect(name, args[0], getattr(module, "routed_weight", None))

        return pre_hook

    def __enter__(self) -> StatsCollector:
        self._handles = [
            module.register_forward_pre_hook(self._hook(name))
            for name, module in self.linears.items()
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._seen = {}

    def release(self, name: str, solved) -> None:
        """Drop layer ``name``'s statistics once every layer sharing them is in ``solved``
        (a mixture of experts has hundreds of Hessians per block: not all at once)."""
        stats = self.stats.get(name)
        group = [n for n, s in self.stats.items() if s is stats]
        if stats is not None and all(n in solved for n in group):
            for n in group:
                del self.stats[n]

    def shared_groups(self) -> list[list[str]]:
        """Names of the layers grouped by the statistics object they share."""
        groups: dict[int, list[str]] = {}
        for name, stats in self.stats.items():
            groups.setdefault(id(stats), []).append(name)
        return list(groups.values())
