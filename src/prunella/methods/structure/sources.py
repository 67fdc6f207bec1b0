"""Where the dense model lives while its structure is chosen and cut: in memory, or
streamed from its checkpoint one block at a time (``--offload disk``).

Both give the structure search the same five things: the one-pass statistics, the units'
removal orders, the dense model's log-probabilities on the fitness windows, a
candidate's KL to them, and the cut model. :class:`InMemory` builds every candidate as a
whole model (:func:`.cut.build`) and the result is a model; :class:`Streamed` holds one
block at a time: the statistics and the KL come from block-by-block forwards (each block
read, cut as the candidate cuts it, run, released), and the result is a checkpoint
written block by block into a folder, which the other axes then stream in turn.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...engine.adapters import adapter_for
from ...engine.forward import capture, given_hidden, head_only, loaded, run_through
from ...errors import PrunellaError
from . import heapr, reap, shortgpt
from .cut import (
    WIDTH_METHODS,
    Shape,
    Statistics,
    add_gram,
    assemble,
    build,
    build_sequential,
    cut_in_order,
    cut_tensors,
    gather,
    kept_units,
    removal_orders,
    smaller_config,
)
from .heapr import Atomic
from .layout import Layout


@dataclass
class Parts:
    """What cutting a candidate takes: the layout, the one-pass statistics, the removal
    orders, whether consumers are refit, the experts and atomic experts."""

    layout: Layout | None
    stats: Statistics
    orders: list | None
    reconstruct: bool
    experts: dict[int, reap.Experts]
    atomic: Atomic | None


def kl(pairs) -> float:
    """Mean KL (nats per token) from the dense log-probabilities to a candidate's, over
    ``pairs`` of them, one window at a time (a window's are ``[1, tokens, vocab]``)."""
    total, tokens = 0.0, 0
    for p, q in pairs:
        total += float((p.exp() * (p - q)).sum())
        tokens += p.shape[0] * p.shape[1]
    return total / tokens


class InMemory:
    """The dense model in memory; candidates and the result are whole models."""

    def __init__(self, model: nn.Module, device, batch_size: int, progress: bool) -> None:
        self.model, self.device, self.batch, self.progress = model, device, batch_size, progress
        self.as_tuple = False  # whether the blocks return tuples (set by a forward)

    def gather(self, windows, layout, experts, atomic) -> Statistics:
        stats = gather(self.model, windows, layout, self.device, self.batch, self.progress, experts)
        if atomic is not None:
            stats.atomic = heapr.scores(self.model, windows, self.batch, self.progress)
        return stats

    def orders(self, layout, stats, method, width, kv):
        return removal_orders(self.model, layout, stats, method, width, kv)

    @torch.no_grad()
    def log_probs(self, window: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """``[1, seqlen - 1, vocab]`` log-probabilities of ``model`` on ``window``."""
        logits = model(window[None].to(self.device), use_cache=False).logits[:, :-1]
        return torch.log_softmax(logits.float(), -1)

    def reference(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """The dense model's last hidden states, per window (its log-probabilities are
        made from them one window at a time: a window's take ``seqlen x vocab`` floats)."""
        last = adapter_for(self.model).blocks(self.model)[-1]
        hidden = []
        for w in windows:
            states, self.as_tuple = run_through(self.model, last, w[None].to(self.device),
                                                use_cache=False)  # fmt: skip
            hidden.append(states)
        return hidden

    def kl(self, shape: Shape, parts: Parts, reference, windows) -> float:
        return self.result_kl(self.one_pass(shape, parts), reference, windows)

    def one_pass(self, shape: Shape, parts: Parts) -> nn.Module:
        p = parts
        return build(self.model, shape, p.layout, p.stats, p.orders, p.reconstruct, p.experts,
                     p.atomic)  # fmt: skip

    def sequential(self, shape, layout, method, windows, experts, retained) -> nn.Module:
        return build_sequential(self.model, shape, layout, method, windows, self.device,
                                self.batch, self.progress, experts, retained)  # fmt: skip

    def depth_only(self, shape: Shape, layout) -> nn.Module:
        return assemble(self.model, shape, layout, {})

    @torch.no_grad()
    def result_kl(self, result: nn.Module, reference, windows) -> float:
        blocks = adapter_for(self.model).blocks(self.model)

        def pairs():  # (the dense model's head on its hidden states, the result's forward)
            for hidden, w in zip(reference, windows, strict=True):
                theirs = self.log_probs(w, result)
                with given_hidden(self.model, blocks, self.device, None, self.as_tuple) as lp:
                    ours = lp(w[None], hidden)
                yield ours, theirs  # (the dense blocks back in place while paused)

        return kl(pairs())


class Streamed:
    """The dense model streamed from its checkpoint (``store``, a
    :class:`~prunella.engine.store.StreamedStore`), one block in memory at a time; the
    result is a checkpoint written into ``folder``."""

    def __init__(self, store, device, batch_size: int, progress: bool, folder: Path) -> None:
        self.store, self.device, self.batch, self.progress = store, device, batch_size, progress
        self.model, self.folder = store.model, Path(folder)
        self.as_tuple = False  # whether the blocks return tuples (set by a forward)
        store.load_head()  # the log-probabilities need it

    def _blocks(self):
        return self.store.blocks()

    @torch.no_grad()
    def gather(self, windows, layout, experts, atomic) -> Statistics:
        """:func:`.cut.gather`, block by block: each block read, its statistics taken on
        the dense activations, released."""
        if atomic is not None:
            raise PrunellaError("internal: atomic experts are not cut from a streamed model")
        blocks = self._blocks()
        acts = capture(self.model, blocks, windows, self.batch, self.device, torch.float32)
        cos = torch.zeros(len(blocks), dtype=torch.float64)
        grams: dict = {}
        stats = Statistics(torch.zeros(0), tokens=windows.numel())
        for i in tqdm(range(len(blocks)), desc="structure statistics", disable=not self.progress,
                      leave=False):  # fmt: skip
            with loaded(self.store, i, self.device, torch.float32) as (block, _):
                hooks = []
                if layout is not None:
                    hooks.append(block.mlp.down_proj.register_forward_pre_hook(
                        lambda m, a: add_gram(grams, "mlp", a[0])))  # fmt: skip
                    hooks.append(block.self_attn.o_proj.register_forward_pre_hook(
                        lambda m, a: add_gram(grams, "attn", a[0])))  # fmt: skip
                sums = counts = None
                if i in experts:
                    sums, counts = (torch.zeros(experts[i].count, dtype=torch.float64)
                                    for _ in range(2))  # fmt: skip
                    module = block.get_submodule(experts[i].path).experts
                    hooks.append(module.register_forward_pre_hook(
                        reap.saliency_hook(sums, counts), with_kwargs=True))  # fmt: skip
                before = list(acts.hidden)
                try:
                    acts.forward(block, i, update=True)
                finally:
                    for h in hooks:
                        h.remove()
                cos[i] = sum(float(shortgpt.token_cosines(x, y))
                             for x, y in zip(before, acts.hidden, strict=True))  # fmt: skip
                if layout is not None:
                    stats.mlp.append(grams.pop("mlp").cpu())
                    stats.attention.append(grams.pop("attn").cpu())
                if sums is not None:
                    stats.saliency[i] = reap.mean_saliency(sums, counts)
        stats.influence = shortgpt.block_influence(cos, windows.numel())
        return stats

    def orders(self, layout, stats, method, width, kv):
        """:func:`.cut.removal_orders`, each block read in turn."""
        rank, group = WIDTH_METHODS[method].removal_order, layout.n_rep * layout.head_dim
        orders = []
        for i in range(len(self._blocks())):
            block = self.store.load(i)
            try:
                orders.append({
                    "channel": rank(block.mlp.down_proj.weight.detach().float(), stats.mlp[i], 1,
                                    width) if width < layout.width else [],
                    "kv": rank(block.self_attn.o_proj.weight.detach().float(), stats.attention[i],
                               group, kv) if kv < layout.kv_groups else [],
                })  # fmt: skip
            finally:
                self.store.release(i)
        return orders

    @torch.no_grad()
    def hidden(self, windows: torch.Tensor, cut=None, removed=()) -> list[torch.Tensor]:
        """Per window, the hidden states leaving the last block, each block ``i`` not in
        ``removed`` run as ``cut(i, block)`` gives it (the dense block by default)."""
        blocks = self._blocks()
        acts = capture(self.model, blocks, windows, 1, self.device, torch.float32)
        for i in range(len(blocks)):
            if i in removed:
                continue  # the hidden states go on as they are
            with loaded(self.store, i, self.device, torch.float32) as (block, _):
                acts.forward(block if cut is None else cut(i, block), i, update=True)
        self.as_tuple = acts.as_tuple
        return list(acts.hidden)

    def reference(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """The dense model's last hidden states, per window (its log-probabilities are
        made from them one window at a time: a window's take ``seqlen x vocab`` floats)."""
        return self.hidden(windows)

    @torch.no_grad()
    def _kl(self, reference, hidden, windows) -> float:
        """KL from the dense log-probabilities to those of ``hidden``, both made by the
        model's own final norm and head, window by window (``[1, seqlen - 1, vocab]``)."""
        blocks = self._blocks()
        with head_only(self.model, blocks, self.device, torch.float32, self.as_tuple) as lp:
            return kl((lp(w[None], d), lp(w[None], h))
                      for w, d, h in zip(windows, reference, hidden, strict=True))  # fmt: skip

    def kl(self, shape: Shape, parts: Parts, reference, windows) -> float:
        def cut(i: int, block: nn.Module) -> nn.Module:
            return _cut_copy(block, i, shape, parts)

        return self._kl(reference, self.hidden(windows, cut, set(shape.removed)), windows)

    def one_pass(self, shape: Shape, parts: Parts) -> Path:
        """The checkpoint of ``shape`` cut from the one-pass statistics."""
        return self._write(shape, parts.layout, parts.atomic,
                           lambda i, block, _: _cut_copy(block, i, shape, parts))  # fmt: skip

    def depth_only(self, shape: Shape, layout) -> Path:
        return self._write(shape, layout, None, lambda i, block, _: block)

    @torch.no_grad()
    def sequential(self, shape, layout, method, windows, experts, retained) -> Path:
        """:func:`.cut.build_sequential`, each block read, cut on the activations of the
        blocks before it as cut (:func:`.cut.cut_in_order`), written, released."""
        acts = capture(self.model, self._blocks(), windows, self.batch, self.device,
                       torch.float32)  # fmt: skip

        def cut(i: int, dense: nn.Module, _) -> nn.Module:
            block = copy.deepcopy(dense)
            cut_in_order(block, i, acts, shape, layout, method, experts, retained)
            return block

        return self._write(shape, layout, None, cut, sequential=acts)

    def result_kl(self, result: Path, reference, windows) -> float:
        from ...engine.store import StreamedStore

        model = StreamedStore(result, adapter_for(self.model))
        probe = Streamed(model, self.device, self.batch, False, result)
        return self._kl(reference, probe.hidden(windows), windows)

    def _write(self, shape, layout, atomic, cut, sequential=None) -> Path:
        """The checkpoint of ``shape`` in :attr:`folder`: block ``i`` as ``cut(i, block,
        acts)`` leaves it, renumbered; the tensors outside the blocks as they are; the
        smaller config. ``sequential``: the activations, which flow through the removed
        blocks unchanged."""
        from ...io.safetensors_io import ShardWriter, write_index

        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.safetensors"):
            old.unlink()
        prefix = self.store.adapter.blocks_path
        kept = [i for i in range(len(self._blocks())) if i not in set(shape.removed)]
        count = len(kept) + 1
        weight_map: dict[str, str] = {}
        for new, i in enumerate(tqdm(kept, desc="structure, block by block",
                                     disable=not self.progress, leave=False)):  # fmt: skip
            shard = f"model-{new + 1:05d}-of-{count:05d}.safetensors"
            with loaded(self.store, i, self.device, torch.float32) as (block, _):
                writer = ShardWriter(folder / shard)
                for local, tensor in cut(i, block, sequential).state_dict().items():
                    name = f"{prefix}.{new}.{local}"
                    writer.add(name, tensor.detach().to("cpu", self._dtype(tensor)))
                    weight_map[name] = shard
                writer.close()
        shard = f"model-{count:05d}-of-{count:05d}.safetensors"
        writer = ShardWriter(folder / shard)
        for name, key in self.store._outside().items():
            if name not in weight_map and not self._tied_head(name):
                writer.add(name, self.store.reader.tensor(key))
                weight_map[name] = shard
        writer.close()
        write_index(folder, weight_map,
                    sum((folder / f).stat().st_size for f in set(weight_map.values())))  # fmt: skip
        smaller_config(self.model.config, shape, layout, atomic).save_pretrained(folder)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(folder)
        return folder

    def _dtype(self, tensor: torch.Tensor) -> torch.dtype:
        """The checkpoint's own dtype for floats (the blocks run in float32): the
        embeddings'."""
        if not tensor.is_floating_point():
            return tensor.dtype
        return self.model.get_input_embeddings().weight.dtype

    def _tied_head(self, name: str) -> bool:
        head = self.model.get_output_embeddings()
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        return (
            tied
            and head is not None
            and name.startswith(next(n for n, m in self.model.named_modules() if m is head))
        )


def _cut_copy(block: nn.Module, i: int, shape: Shape, parts: Parts) -> nn.Module:
    """A copy of dense block ``i`` cut as :func:`.cut.build` cuts it (one-pass)."""
    p = parts
    cut = copy.deepcopy(block)
    tensors: dict[str, torch.Tensor] = {}
    moe = p.experts.get(i)
    if shape.experts and moe is not None:
        order = reap.removal_order(p.stats.saliency[i], shape.experts)
        reap.cut_experts(cut, moe, kept_units(order, moe.count, shape.experts))
    if p.layout is not None:
        keep = {
            "channel": kept_units(p.orders[i]["channel"], p.layout.width, shape.width),
            "kv": kept_units(p.orders[i]["kv"], p.layout.kv_groups, shape.kv_groups),
        }
        grams = {}
        if p.reconstruct and shape.width < p.layout.width:
            grams["mlp.down_proj"] = p.stats.mlp[i]
        if p.reconstruct and shape.kv_groups < p.layout.kv_groups:
            grams["self_attn.o_proj"] = p.stats.attention[i]
        tensors = cut_tensors(block, p.layout, keep, grams)
    for local, tensor in tensors.items():
        cut.get_parameter(local).data = tensor
    return cut
