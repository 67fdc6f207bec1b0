"""Fitness of a candidate allocation: its KL divergence to the dense model.

EvoPress's fitness (``src/metrics.py``): on calibration tokens only,

    KL = (1/T) sum_t sum_v p_dense(v | x_<t) (log p_dense(v | x_<t) - log p_cand(v | x_<t))

in nats per predicted token, temperature 1, the full vocabulary. The candidate is
stitched from the :mod:`level database <prunella.search.levels>`: block by block,
each linear layer runs with its level's pruned weight read from disk, so the model
is never re-pruned and never copied. The forward goes one block at a time through
the :mod:`store <prunella.store>`, so a model larger than memory is scored too
(slower: every candidate reads its blocks again).

The dense reference is cached once per window as the hidden states leaving the
last block (``hidden`` numbers per token, not ``vocab``: EvoPress keeps the full
logits in RAM, which is 85x larger for SmolLM2); both distributions are then made
by the model's own final norm and LM head, window by window.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ...engine.prune import capture, forward_precision, matmuls_in, on_device
from .levels import LevelDatabase, swap_in


class _Given(nn.Module):
    """Stands in for a block when logits are made from known final hidden states: the
    first returns them, the others pass their input on."""

    def __init__(self, given: list, as_tuple: bool) -> None:
        super().__init__()
        self.given, self.as_tuple = given, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.given.pop() if self.given else hidden_states
        return (out,) if self.as_tuple else out  # as the real blocks return it


block_outputs: list[bool] = []  # whether the blocks of the last forward returned tuples


@torch.no_grad()
def final_hidden(
    store,
    windows: torch.Tensor,
    weight_of,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
) -> list[torch.Tensor]:
    """The hidden states leaving the last block, per batch of ``windows``, with each
    linear layer ``name`` running ``weight_of(name)`` (``None``: its own weight)."""
    dtype, matmul_dtype = forward_precision(dtype, device)
    blocks = store.blocks()
    acts = capture(store.model, blocks, windows, batch_size, device, dtype)
    block_outputs.clear()
    prefix_of = f"{store.adapter.blocks_path}."
    for i in range(len(blocks)):
        block = store.load(i)
        swapped = []
        try:
            for local, layer in store.adapter.linears(block).items():
                weight = weight_of(f"{prefix_of}{i}.{local}")
                if weight is not None:
                    swapped.append(swap_in(layer, weight))
            hook = block.register_forward_hook(
                lambda module, args, out: block_outputs.append(isinstance(out, tuple))
            )
            try:
                with on_device(block, device, dtype), matmuls_in(matmul_dtype, device):
                    acts.forward(block, i, update=True)
            finally:
                hook.remove()
        finally:
            for restore in swapped:
                restore()
            store.release(i)
    return acts.hidden


@contextlib.contextmanager
def head_only(
    model: nn.Module, blocks: nn.ModuleList, device: torch.device, dtype: torch.dtype,
    as_tuple: bool = False,
):  # fmt: skip
    """Yields ``log_probs(ids, hidden)``: ``log p(v | x_<t)`` (float32, ``[batch, seqlen - 1,
    vocab]``) made from the hidden states leaving the last block by the model's own final
    norm and LM head (every block stood in for by :class:`_Given`)."""
    originals = list(blocks)
    given: list = []
    try:
        for i in range(len(originals)):
            blocks[i] = _Given(given, as_tuple)
        run_dtype, matmul_dtype = forward_precision(dtype, device)
        with on_device(model, device, run_dtype), matmuls_in(matmul_dtype, device):

            def log_probs(ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
                given.append(hidden.to(device=device, dtype=run_dtype))
                logits = model(input_ids=ids.to(device), use_cache=False).logits[:, :-1]
                return F.log_softmax(logits.float(), dim=-1)

            yield log_probs
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


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
        self.tokens = 0  # predicted tokens scored so far (for throughput figures)

    def _hidden(self, ids: list[int], weight_of) -> list[torch.Tensor]:
        """Final hidden states of windows ``ids``, one ``[1, seqlen, hidden]`` each."""
        out = []
        for start in range(0, len(ids), 64):  # bounded activations, whatever the stage
            part = ids[start : start + 64]
            batches = final_hidden(
                self.store,
                self.windows[part],
                weight_of,
                device=self.device,
                dtype=self.dtype,
                batch_size=self.batch_size,
            )
            out.extend(h for batch in batches for h in batch.split(1))
        return out

    @property
    def as_tuple(self) -> bool:
        """Whether this model's blocks return tuples (Bloom, Falcon, MPT) or tensors."""
        if not block_outputs:
            self._hidden([0], lambda _: None)
        return block_outputs[0]

    def dense(self, ids: list[int]) -> list[torch.Tensor]:
        """The dense model's final hidden states of windows ``ids``, computed once."""
        path = {j: self.dense_dir / f"{j}.safetensors" for j in ids}
        missing = [j for j in ids if not path[j].exists()]
        if missing:
            for j, h in zip(missing, self._hidden(missing, lambda _: None), strict=True):
                partial = path[j].with_suffix(".partial")
                save_file({"hidden": h.contiguous().cpu()}, partial)
                os.replace(partial, path[j])
        return [load_file(path[j])["hidden"] for j in ids]

    def __call__(self, levels: dict[str, int], ids: list[int]) -> float:
        dense = self.dense(ids)
        candidate = self._hidden(ids, lambda name: self.database.weight(name, levels[name]))
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
