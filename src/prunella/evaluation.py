"""Evaluation: perplexity on held-out text.

``PPL = exp( sum_t -log p(x_t | x_<t) / T )`` over non-overlapping windows of
``seqlen`` tokens, each window predicted from its own start (the protocol of the
SparseGPT and Wanda papers); ``T`` counts the predicted tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``windows`` (``LongTensor[count, seqlen]``)."""
    nll, tokens = 0.0, 0
    batches = range(0, len(windows), batch_size)
    for b in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
        ids = windows[b : b + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        targets = ids[:, 1:]
        nll += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
        ).item()
        tokens += targets.numel()
    mean = nll / tokens
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": tokens,
        "windows": len(windows),
        "seqlen": windows.shape[1],
    }
