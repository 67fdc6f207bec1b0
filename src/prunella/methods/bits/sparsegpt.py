"""SparseGPT's joint sparsification and quantization: pruned and quantized in one sweep.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023, section 3.5: in SparseGPT's column sweep, each column's kept
weights are rounded to the grid as the sweep reaches them, and the whole error (pruning
and rounding) is spread over the later columns, so that the later masks and roundings
see it (:func:`prunella.methods.sparsity.sparsegpt.prune` with a ``grid``).

``--quantizer sparsegpt`` with ``--solver sparsegpt`` (uniform rows) prunes and quantizes
each layer in that one sweep (:class:`JointSweep`). Alone, or after another solver, it
is that sweep at 0% sparsity: GPTQ in the natural column order (no act-order), the
weights already zero kept zero. Defaults are SparseGPT's (block 128, dampening 1%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.stats import LayerStats
from ...errors import PrunellaError
from ..sparsity import sparsegpt as solver
from ..sparsity.patterns import Unstructured
from .grid import Grid

PAPER = f"{solver.PAPER} (joint sparsification and quantization)"
NEEDS = solver.NEEDS
OPTIONS = solver.OPTIONS  # the sweep's own: block 128, dampening 1%


def quantize(
    weight: torch.Tensor, grid: Grid, stats: LayerStats, *, blocksize: int, percdamp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The quantized weight (float32), its scales and zero points, and facts: the joint
    sweep at 0% sparsity, the zeros already there (pruned weights) kept zero."""
    new, facts = solver.prune(weight, Unstructured(0.0), stats, blocksize=blocksize,
                              percdamp=percdamp, grid=grid)  # fmt: skip
    return new, facts.pop("scale"), facts.pop("zero"), facts


def check_joint(recipe) -> None:
    """One line before any work: pruned by SparseGPT in the same sweep, the quantizer's
    options must be the solver's (the sweep takes the solver's)."""
    pruned = recipe.sparsity is not None or ":" in str(recipe.pattern)
    joint = pruned and recipe.solver.name == "sparsegpt" and recipe.rows.name == "uniform"
    if joint and recipe.quantizer.options != recipe.solver.options:
        raise PrunellaError(
            "--quantizer sparsegpt runs inside --solver sparsegpt's sweep, which takes the "
            f"solver's options: {recipe.solver.options} differ from the quantizer's "
            f"{recipe.quantizer.options} (set them with --solver-opt)"
        )


@dataclass
class JointSweep:
    """The sparsity and bits axes' compressors as one: SparseGPT prunes each layer to its
    pattern and quantizes its kept weights to its grid in the same sweep."""

    pruner: object  # the sparsity axis's compressor (SparseGPT, uniform rows)
    quantizer: object  # the bits axis's compressor (this quantizer)
    axes: tuple[str, str] = ("sparsity", "bits")
    axis: str = "sparsity+bits"

    @property
    def name(self) -> str:
        return "sparsegpt, pruned and quantized in one sweep"

    @property
    def needs(self) -> frozenset[str]:
        return self.pruner.needs | self.quantizer.needs

    @property
    def data_free_note(self) -> str:
        return f"{self.pruner.data_free_note}; {self.quantizer.data_free_note}"

    def __call__(self, weight: torch.Tensor, level: dict, stats, data_free: bool = False):
        pattern, grid = level["sparsity"], level["bits"]
        if data_free:  # what needs no statistics, one axis after the other
            weight, facts = self.pruner(weight, pattern, stats, True)
            new, more = self.quantizer(weight, grid, stats, True)
            return new, facts | more
        new, facts = solver.prune(weight, pattern, stats, grid=grid, **self.pruner.solver_options)
        tensors = {"weight_scale": facts.pop("scale")}
        zero = facts.pop("zero")
        if not grid.symmetric:
            tensors["weight_zero_point"] = zero
        return new, facts | {"group": grid.group, "sweep": "joint", "tensors": tensors}

    def describe(self, level: dict) -> dict:
        return self.pruner.describe(level["sparsity"]) | self.quantizer.describe(level["bits"])
