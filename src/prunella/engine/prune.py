"""The sequential engine: compress a model block by block on calibration data.

1. *Capture*: run the model on the calibration windows with every decoder block
   replaced by a recorder, which keeps the hidden states entering block 0 and
   the exact arguments the model passes each block (attention masks, rotary
   embeddings, position ids), then stops before the LM head.
2. For each block ``i``, with only that block on the compute device:
   a. *statistics*: forward the block's inputs through the dense block with
      hooks that accumulate what the axes' methods declare (Hessian, input norms);
   b. *solve*: compress every linear layer of the block to its level on each axis
      of the plan, in axis order, with each axis's compressor (sparsity: the row
      method around the solver);
   c. *propagate*: forward the inputs through the pruned block; the outputs,
      written over the inputs, are block ``i+1``'s inputs. The relative
      reconstruction error ``||(W - W_hat) X|| / ||W X||`` of each layer is
      measured here, on its first ``error_tokens`` input tokens.

Solvers that need no statistics (magnitude) skip step (a). Calibration windows
are processed in batches of ``batch_size`` windows; the activations of all
windows for the current block are the only large buffer. Blocks come from a
:mod:`store <prunella.engine.store>` (in memory or streamed from disk), which the
engine asks to load each block before it and release it after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunellaError
from .adapters import block_index, get_weight, set_weight
from .experts import ExpertLinear, routed
from .forward import Activations, capture, forward_precision, matmuls_in, on_device, run_in_lockstep
from .heap import trim_heap
from .stats import StatsCollector, exact

ONE_PASS_BYTES = 4 * 2**30  # the waiting activations one pass may hold, at most


def default_batch_size(seqlen: int, device: torch.device | None = None) -> int:
    """Windows per forward: 4096 tokens' worth on CPU (small temporaries), 16384 on a GPU."""
    tokens = 16384 if device is not None and device.type == "cuda" else 4096
    return max(1, tokens // seqlen)


def one_pass_bytes(config, nsamples: int, seqlen: int) -> int:
    """What one pass holds while every batch waits at a layer: about ``(hidden + widest
    layer)`` float32 numbers per calibration token, twice over for temporaries."""
    width = max(getattr(config, "intermediate_size", 0) or 0, 4 * config.hidden_size)
    return 2 * nsamples * seqlen * (config.hidden_size + width) * 4


def choose_passes(passes: int | str, config, nsamples: int, seqlen: int) -> int:
    """1 or 2 passes per block; ``"auto"`` takes 1 when :func:`one_pass_bytes` is at most
    :data:`ONE_PASS_BYTES`. It depends on the model and the calibration size only, never
    on the machine's free memory, so the same command gives the same masks anywhere."""
    if passes in (1, 2, "1", "2"):
        return int(passes)
    if passes != "auto":
        raise PrunellaError(f"passes must be 1, 2 or auto, got {passes!r}")
    return 1 if one_pass_bytes(config, nsamples, seqlen) <= ONE_PASS_BYTES else 2


class ErrorProbe:
    """Relative error ``||(W - W_hat) X|| / ||W X||`` of each layer on its first input tokens.

    As a context manager it measures with forward pre-hooks; :meth:`add` measures
    one input directly. A layer's dense weight is dropped from ``dense`` as soon as
    its tokens are measured (or its last batch has passed), so that a block's dense
    copies do not all stay in memory while the batches go through it.
    """

    def __init__(
        self,
        linears: dict[str, nn.Module],
        dense: dict[str, torch.Tensor],
        pruned: dict[str, torch.Tensor],
        tokens: int,
        batches: int,
    ):
        self.linears, self.dense, self.pruned, self.tokens = linears, dense, pruned, tokens
        self.batches = batches
        self.seen = dict.fromkeys(linears, 0)
        self.calls = dict.fromkeys(linears, 0)
        self.rows = dict.fromkeys(linears, 0)  # input tokens, all of them
        self.err = dict.fromkeys(linears, 0.0)
        self.ref = dict.fromkeys(linears, 0.0)
        self._handles: list = []

    def add(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        self.calls[name] += 1
        self.rows[name] += x[..., 0].numel()
        take = self.tokens - self.seen[name]
        # (a block run again to locate NaN or Inf activations finds dense weights gone)
        if take > 0 and name in self.dense:
            with exact(x):
                x = x.reshape(-1, x.shape[-1])[:take].float()
                w = self.dense[name].float()
                w_hat = self.pruned[name].to(device=w.device, dtype=torch.float32)
                self.err[name] += (x @ (w - w_hat).t()).square().sum().item()
                self.ref[name] += (x @ w.t()).square().sum().item()
                self.seen[name] += x.shape[0]
        if self.seen[name] >= self.tokens or self.calls[name] == self.batches:
            self.dense.pop(name, None)

    def __enter__(self) -> ErrorProbe:
        self._handles = [
            m.register_forward_pre_hook(lambda mod, args, n=n: self.add(n, mod, args[0]))
            for n, m in self.linears.items()
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def relative_error(self, name: str) -> float:
        return (self.err[name] / self.ref[name]) ** 0.5 if self.ref[name] > 0 else 0.0


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    levels: dict  # what the axes say of the layer's level (sparsity: pattern, target)
    sparsity: float
    rel_error: float
    info: dict = field(default_factory=dict)
    # tensors stored beside the weight (the bits axis's scales), not in the report
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        """The report row: name, shape, the levels, achieved sparsity, error, facts."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            **self.levels,
            "sparsity": self.sparsity,
            "rel_error": self.rel_error,
            **self.info,
        }


def level_of(levels: dict, compressor):
    """A layer's level for ``compressor`` (``levels``: axis -> level): its axis's, or for a
    compressor of several axes (``axes``: SparseGPT's joint sweep) each of theirs."""
    axes = getattr(compressor, "axes", None)
    return {a: levels[a] for a in axes} if axes else levels[compressor.axis]


@dataclass
class BlockPruner:
    """Compresses the linear layers of one block at a time, in one or two passes:
    each layer to its level on every axis (``levels[layer][axis]``), by the axes'
    compressors in axis order."""

    levels: dict[str, dict]
    compressors: list
    error_tokens: int
    one_pass: bool
    timings: dict[str, float]
    expert_min_tokens: int = 0

    @property
    def needs(self) -> frozenset[str]:
        """The statistics the compressors read."""
        return frozenset().union(*(c.needs for c in self.compressors))

    def solve(self, name: str, layer: nn.Module, stats, master: torch.Tensor) -> tuple:
        """Compress ``master`` (the checkpoint's weight of ``layer``) in place, and the copy
        ``layer`` runs with; return the dense weight (float32) and the compressors' facts.

        The compressors start from ``master`` at full precision, never from the forward's
        copy, which may be narrower (bfloat16 on CPU).
        """
        tick = time.perf_counter()
        running = get_weight(layer)
        dense = master.detach().to(device=running.device, dtype=torch.float32, copy=True)
        if not torch.isfinite(dense).all():
            raise PrunellaError(f"layer {name} has NaN or Inf weights")
        if stats is not None and not stats.finite():
            raise PrunellaError(
                f"NaN or Inf activations in block {block_index(name)}: the inputs of {name} "
                "are not finite (or too large to square in float32): the model is "
                "numerically broken"
            )

        # an expert routed too few tokens for statistics: what needs no calibration data
        few = isinstance(layer, ExpertLinear) and stats is not None
        few = few and stats.tokens < self.expert_min_tokens
        new, info = dense.clone(), {}
        with exact(dense):
            for compressor in self.compressors:
                new, facts = compressor(new, level_of(self.levels[name], compressor), stats, few)
                info["tensors"] = info.get("tensors", {}) | facts.pop("tensors", {})
                info |= facts
        if few:
            info["note"] = (
                f"the router sent this expert {stats.tokens} calibration tokens "
                f"(fewer than {self.expert_min_tokens}): "
                + "; ".join(c.data_free_note for c in self.compressors)
            )
        # Round to the checkpoint's dtype now, so that what follows is calibrated on
        # exactly the weights that will be saved.
        master.copy_(new)
        if running.data_ptr() != master.data_ptr():
            set_weight(layer, master)
        # With one pass every batch waits here holding its activations: give back the
        # pages of the holes their temporaries left in the heap (see prunella.engine.heap).
        trim_heap()
        self.timings["solve"] += time.perf_counter() - tick
        return dense, info

    def __call__(
        self,
        index: int,
        block: nn.Module,
        prefix: str,
        acts: Activations,
        linears: dict[str, nn.Module],
        masters: dict[str, torch.Tensor],
    ) -> list:
        dense: dict[str, torch.Tensor] = {}
        info: dict[str, dict] = {}

        def routed_tokens(local: str) -> dict:
            """An expert's routed calibration tokens, for the report."""
            return (
                {"routed_tokens": probe.rows[local]}
                if isinstance(linears[local], ExpertLinear)
                else {}
            )

        probe = ErrorProbe(linears, dense, masters, self.error_tokens, len(acts.hidden))
        collector = StatsCollector(linears, self.needs)
        timings = self.timings
        if self.one_pass:
            # One forward: each layer is pruned once every batch's input to it has arrived
            # (from the already-pruned layers before it), and the forward goes on with it.
            def arrive(local: str, module: nn.Module, x: torch.Tensor) -> None:
                if self.needs:
                    tick = time.perf_counter()
                    collector.collect(local, x, getattr(module, "routed_weight", None))
                    timings["statistics"] += time.perf_counter() - tick

            def complete(local: str, module: nn.Module) -> None:
                dense[local], info[local] = self.solve(
                    prefix + local, module, collector.stats.get(local), masters[local]
                )
                collector.release(local, solved=info)

            def resume(local: str, module: nn.Module, x: torch.Tensor) -> None:
                probe.add(local, module, x)

            inside = timings["statistics"] + timings["solve"]
            tick = time.perf_counter()
            run_in_lockstep(acts, block, index, linears, arrive, complete, resume)
            inside = timings["statistics"] + timings["solve"] - inside
            timings["propagate"] += time.perf_counter() - tick - inside
        else:
            tick = time.perf_counter()
            if self.needs and linears:
                with collector:
                    acts.forward(block, index, update=False)
            timings["statistics"] += time.perf_counter() - tick
            for local, layer in linears.items():
                dense[local], info[local] = self.solve(
                    prefix + local, layer, collector.stats.get(local), masters[local]
                )
                collector.release(local, solved=info)
            tick = time.perf_counter()
            with probe:
                acts.forward(block, index, update=True)
            timings["propagate"] += time.perf_counter() - tick
        return [
            LayerResult(
                name=prefix + local,
                shape=tuple(weight.shape),
                levels={
                    k: v
                    for c in self.compressors
                    for k, v in c.describe(level_of(self.levels[prefix + local], c)).items()
                },
                sparsity=(weight == 0).sum().item() / weight.numel(),
                rel_error=probe.relative_error(local),
                tensors={k: t.cpu() for k, t in info[local].pop("tensors").items()},
                info=info[local] | routed_tokens(local),
            )
            for local, weight in masters.items()
        ]


@torch.no_grad()
def prune_blocks(
    store,
    windows: torch.Tensor,
    levels: dict[str, dict],
    compressors: list,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    error_tokens: int = 2048,
    progress: bool = True,
    start: int = 0,
    hidden: list[torch.Tensor] | None = None,
    after_block: Callable[[int, Activations, list[LayerResult]], None] | None = None,
    one_pass: bool = False,
    expert_min_tokens: int = 0,
) -> tuple[list[LayerResult], dict[str, float]]:
    """Compress every linear layer named in ``levels``, block by block, in place: layer
    ``name`` to ``levels[name][axis]`` on each axis, by ``compressors`` (one per axis,
    in axis order; :mod:`prunella.methods`).

    ``store`` holds the model (:mod:`prunella.engine.store`): each block is loaded before
    it is pruned and released after ``after_block(i, activations, results)`` has run
    (to save progress). ``start`` and ``hidden`` resume at a block with its saved
    inputs. Returns one :class:`LayerResult` per pruned layer and the seconds spent
    per phase (``read`` is the time the store took to load blocks).

    ``one_pass``: instead of a statistics pass over the dense block and a second
    pass over the pruned one (the papers' protocol), run the batches through the
    block once, in lockstep (:func:`run_in_lockstep`), pruning each layer when all
    its inputs have arrived; every layer is then calibrated on the outputs of the
    pruned layers before it, and the block's outputs need no second pass.

    Fused experts run through their views (:func:`prunella.engine.experts.routed`): each
    expert's matrices are layers, calibrated on the tokens routed to that expert; an
    expert with fewer than ``expert_min_tokens`` of them is compressed by what needs no
    calibration data (each axis's fallback: magnitude for sparsity).
    """
    timings = dict.fromkeys(("capture", "read", "statistics", "solve", "propagate"), 0.0)
    tick = time.perf_counter()
    dtype, matmul_dtype = forward_precision(dtype, device)
    blocks = store.blocks()
    acts = capture(store.model, blocks, windows, batch_size, device, dtype)
    if hidden is not None:
        acts.hidden = [h.to(device=device, dtype=dtype) for h in hidden]
    store.after_capture()
    timings["capture"] = time.perf_counter() - tick
    pruner = BlockPruner(levels, compressors, error_tokens, one_pass, timings, expert_min_tokens)
    blocks_path = store.adapter.blocks_path

    results: list[LayerResult] = []
    bar = tqdm(
        range(start, len(blocks)),
        desc=f"compressing ({'; '.join(c.name for c in compressors)})",
        unit="block",
        disable=not progress,
        initial=start,
        total=len(blocks),
    )
    for i in bar:
        tick = time.perf_counter()
        block = store.load(i)
        timings["read"] += time.perf_counter() - tick
        prefix = f"{blocks_path}.{i}."
        linears = {
            local: layer
            for local, layer in store.adapter.linears(block).items()
            if prefix + local in levels
        }
        # The pruned weights go straight into the checkpoint's tensors (in its dtype);
        # the block runs on a copy when it moves device or dtype.
        masters = {local: get_weight(layer) for local, layer in linears.items()}
        with on_device(block, device, dtype), matmuls_in(matmul_dtype, device), routed(block):
            block_results = pruner(i, block, prefix, acts, linears, masters)
        trim_heap()  # give back what this block's temporaries held (see prunella.engine.heap)
        results.extend(block_results)
        if after_block is not None:
            after_block(i, acts, block_results)
        store.release(i)
    return results, timings
