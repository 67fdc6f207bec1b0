"""Fitness of a candidate allocation: its KL divergence to the dense model.

EvoPress's fitness (``src/metrics.py``): on calibration tokens only,

    KL = (1/T) sum_t sum_v p_dense(v | x_<t) (log p_dense(v | x_<t) - log p_cand(v | x_<t))

in nats per predicted token, temperature 1, the full vocabulary. The candidate is
stitched from the :mod:`level database <prunella.methods.search.levels>`: block by block,
each linear layer runs with its level's pruned weight read from disk, so the model
is never re-pruned and never copied. The forward goes one block at a time through
the :mod:`store <prunella.engine.store>`, so a model larger than memory is scored too
(slower: every candidate reads its blocks again).

The dense reference is cached once per window as the hidden states leaving the
last block (``hidden`` numbers per token, not ``vocab``: EvoPress keeps the full
logits in RAM, which is 85x larger for SmolLM2); both distributions are then made
by the model's own final norm and LM head, window by window.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ...engine.forward import head_only, propagate
from .levels import LevelDatabase


class KLFitness:
    """``fitness(levels, window_ids)``: the mean KL per token from the dense model to the
    candidate ``levels`` (layer -> level of ``database``) on those calibration windows."""

    def __init__(
        self,
        store,
        windows: torch.Tensor,
        database: LevelDatabase,
        *,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        self.store, self.windows, self.database = store, windows, database
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.dense_dir = database.folder / "dense"
        self.dense_dir.mkdir(exist_ok=True)
        store.load_head()
        # a candidate's weights as the checkpoint would hold them (its dtype), as pruning
        # rounds them, whatever dtype the forward then runs in
        self.model_dtype = next(store.model.parameters()).dtype
        self._as_tuple: bool | None = None
        self.tokens = 0  # predicted tokens scored so far (for throughput figures)

    def _hidden(self, ids: list[int], weight_of) -> list[torch.Tensor]:
        """Final hidden states of windows ``ids``, one ``[1, seqlen, hidden]`` each."""
        out = []
        for start in range(0, len(ids), 64):  # bounded activations, whatever the stage
            part = ids[start : start + 64]
            acts = propagate(
                self.store,
                self.windows[part],
                device=self.device,
                dtype=self.dtype,
                batch_size=self.batch_size,
                weight_of=weight_of,
            )
            self._as_tuple = acts.as_tuple
            out.extend(h for batch in acts.hidden for h in batch.split(1))
        return out

    @property
    def as_tuple(self) -> bool:
        """Whether this model's blocks return tuples (Bloom, Falcon, MPT) or tensors."""
        if self._as_tuple is None:
            self._hidden([0], None)
        return self._as_tuple

    def dense(self, ids: list[int]) -> list[torch.Tensor]:
        """The dense model's final hidden states of windows ``ids``, computed once."""
        path = {j: self.dense_dir / f"{j}.safetensors" for j in ids}
        missing = [j for j in ids if not path[j].exists()]
        if missing:
            for j, h in zip(missing, self._hidden(missing, None), strict=True):
                partial = path[j].with_suffix(".partial")
                save_file({"hidden": h.contiguous().cpu()}, partial)
                os.replace(partial, path[j])
        return [load_file(path[j])["hidden"] for j in ids]

    def __call__(self, levels: dict[str, int], ids: list[int]) -> float:
        dense = self.dense(ids)
        candidate = self._hidden(
            ids, lambda name, _: self.database.weight(name, levels[name]).to(self.model_dtype)
        )
        total, count = 0.0, 0
        head = head_only(
            self.store.model, self.store.blocks(), self.device, self.dtype, self.as_tuple
        )
        with torch.no_grad(), head as log_probs:
            for j, ref_h, cand_h in zip(ids, dense, candidate, strict=True):
                window = self.windows[j : j + 1]
                ref, cand = log_probs(window, ref_h), log_probs(window, cand_h)
                total += F.kl_div(cand, ref, reduction="sum", log_target=True).item()
                count += ref.shape[1]
        self.tokens += count
        return total / count
