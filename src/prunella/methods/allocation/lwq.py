"""LWQ: layer importance by how much a block modifies its input.

Dumitru et al., "Layer-Wise Quantization: A Pragmatic and Effective Method for
Quantizing LLMs Beyond Integer Bit-Levels", 2024.

Metric: the *layer input modification* (LIM) of block ``i`` on the dense model's
calibration tokens, with ``x`` a token's hidden state entering the block and ``y`` the
same token's leaving it,

    LIM_i = - mean over tokens of  x . y / (||x|| ||y||),

so a block that changes its input more (a lower cosine) scores higher and is more
important.

Mapping: the paper ranks the blocks by LIM and quantizes the most important ones at the
higher of two widths, the rest at the lower, as many as the average allows. Here the
rank alone sets the raw ratios, ``r_i = target + spread (1 - 2 rank_i / (n - 1))``
(rank 0 the least important: it loses the most), with a small ``spread`` (0.01 of a
16-bit layer, 0.16 bits), so the bits axis's fitter gives the blocks the two widths
around the average and moves the most important up first: the paper's rule. Where we
differ: the paper lets the user pick the two widths (e.g. 2 and 4 for 3 bits); the
fitter takes the two nearest the average, and the average counts the scales. The
scores serve any axis (on sparsity: the least modifying blocks are pruned more).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...engine.experts import routed
from ...engine.forward import capture, forward_precision, loaded, matmuls_in
from ...engine.stats import HIDDEN
from ...registry import Option
from ..plan import allocation_units, check_finite
from .run import AllocationRun, Scores

PAPER = (
    "Dumitru et al., Layer-Wise Quantization: A Pragmatic and Effective Method for "
    "Quantizing LLMs Beyond Integer Bit-Levels, 2024"
)
NEEDS = frozenset({HIDDEN})
OPTIONS = (
    Option("spread", float, 0.01, "half-width of the raw ratios around the target", low=0.0),
)
METRIC = "lim"


def layer_input_modification(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``-cos(x, y)`` summed over the tokens of ``[..., hidden]`` inputs and outputs."""
    cos = torch.nn.functional.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
    return -cos.sum()


def allocate(run: AllocationRun, **_) -> Scores:
    """LIM of every block, from one pass of the calibration windows through the dense
    blocks."""
    store = run.store
    dtype, matmul_dtype = forward_precision(run.dtype, run.device)
    blocks = store.blocks()
    acts = capture(store.model, blocks, run.windows, run.batch_size, run.device, dtype)
    scores = {}
    for i in tqdm(range(len(blocks)), desc="allocation (lwq)", unit="block",
                  disable=not run.progress):  # fmt: skip
        inputs = list(acts.hidden)
        with (
            loaded(store, i, run.device, dtype) as (block, _),
            torch.no_grad(),
            matmuls_in(matmul_dtype, run.device),
            routed(block),
        ):
            acts.forward(block, i, update=True)
        pairs = zip(inputs, acts.hidden, strict=True)
        total = sum(layer_input_modification(x, y) for x, y in pairs)
        tokens = sum(x.shape[0] * x.shape[1] for x in inputs)
        scores[f"{store.adapter.blocks_path}.{i}"] = (total / tokens).item()
    check_finite(scores.values(), "LWQ's layer input modification")
    units = allocation_units(list(store.layers()), store.adapter.blocks_path, "block")
    return Scores(scores, units=units, granularity="block")


def lwq_ratios(
    metric: torch.Tensor, target: float, sizes: torch.Tensor, *, spread: float, **_
) -> torch.Tensor:
    """Raw ratios from the LIM ranks: the most important block ``target - spread``, the
    least ``target + spread``, evenly between."""
    n = len(metric)
    if n < 2:
        return torch.full_like(metric, target)
    rank = torch.empty_like(metric)
    rank[metric.argsort()] = torch.arange(n, dtype=metric.dtype)
    return target + spread * (1 - 2 * rank / (n - 1))


ratios = lwq_ratios  # the registry's hook
