"""Block-by-block forward passes: the one home of every loop over the decoder blocks.

Everything that runs calibration windows through the model goes block by block, with
one block loaded from the :mod:`store <prunella.engine.store>` (and copied to the
compute device) at a time:

* :func:`capture` -- the hidden states entering block 0 and the exact arguments the
  model passes each block (attention masks, rotary embeddings, position ids), by
  running the model with every block replaced by a recorder;
* :func:`visit_blocks` -- the dense blocks, with the statistics of their linear
  layers gathered on the way (what score-based allocations read);
* :func:`propagate` -- the hidden states leaving the last block, with any layer
  running another weight (a candidate of a search, Lua's masked weights);
* :func:`head_only`, :func:`given_hidden` -- log-probabilities from final hidden
  states, through the model's own final norm and LM head; :func:`next_token_loss` on
  top of them;
* :func:`run_in_lockstep` -- one forward of all batches through a block that meet
  at each linear layer (the pruning loop's one-pass mode, :mod:`prunella.engine.prune`).

:mod:`prunella.engine.gradients` adds the backward pass, one block at a time.
Precision: :func:`forward_precision` says how a forward "in ``dtype``" runs on each
device (on a CPU, narrower matmuls under autocast and float32 activations).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunellaError
from .adapters import get_weight
from .experts import routed
from .stats import StatsCollector

WeightOf = Callable[[str, torch.Tensor], torch.Tensor | None]


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for block ``index`` during capture: records its call, returns its input."""

    def __init__(self, index: int, calls: list, last: bool) -> None:
        super().__init__()
        self.index, self.calls, self.last = index, calls, last

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.calls[self.index] = (hidden_states if self.index == 0 else None, args, kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Run ``module`` with its parameters and buffers copied to ``device`` (floats in ``dtype``).

    The original tensors are put back on exit, exactly as they were: what happened
    to the copies is dropped. When nothing needs to move, the module runs on its own
    tensors.
    """
    copies: dict[int, torch.Tensor] = {}
    originals: list[tuple[dict, str, torch.Tensor]] = []
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, tensor in store.items():
                if tensor is None or tensor.is_meta:  # not in memory, and not used
                    continue
                target = dtype if tensor.is_floating_point() else tensor.dtype
                if tensor.device == device and tensor.dtype == target:
                    continue
                if id(tensor) not in copies:
                    copy = tensor.detach().to(device=device, dtype=target)
                    if isinstance(tensor, nn.Parameter):
                        copy = nn.Parameter(copy, requires_grad=False)
                    copies[id(tensor)] = copy
                originals.append((store, key, tensor))
                store[key] = copies[id(tensor)]
    try:
        yield
    finally:
        for store, key, tensor in originals:
            store[key] = tensor


def forward_precision(
    dtype: torch.dtype, device: torch.device
) -> tuple[torch.dtype, torch.dtype | None]:
    """How a calibration forward "in ``dtype``" runs: ``(storage, matmul)`` dtypes.

    On a GPU the block's weights and activations are simply ``dtype`` (the model's
    half precision, as the references run). On a CPU a narrower ``dtype`` is used for
    the matrix products only, under :func:`torch.autocast`: weights, the residual
    stream carried from block to block, norms and softmax stay float32. Rounding the
    residual stream to bfloat16 after every block is what cost accuracy (SmolLM2,
    SparseGPT 2:4, two passes: perplexity 42.08 with a pure bfloat16 forward, 41.58
    mixed, 41.33 float32), while the bfloat16 GEMMs are what buys the speed.
    """
    if device.type == "cpu" and dtype != torch.float32:
        return torch.float32, dtype
    return dtype, None


def matmuls_in(
    dtype: torch.dtype | None, device: torch.device
) -> contextlib.AbstractContextManager:
    """Autocast the matrix products to ``dtype`` (nothing when ``None``).

    The cast cache is off: weights are pruned in place between two forwards, and a
    cached cast would keep serving the dense weight.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


@dataclass
class Activations:
    """The calibration activations entering the current block, in batches.

    ``hidden[b]`` is ``[batch, seqlen, hidden_size]``; ``calls[b][i]`` holds the
    positional and keyword arguments the model passed block ``i`` for batch ``b``.
    """

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]
    as_tuple: bool = False  # whether the blocks return tuples (Bloom, Falcon, MPT) or tensors

    def run(
        self, block: nn.Module, index: int, b: int, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Block ``index``'s output on batch ``b``'s inputs (or on ``hidden``, with batch
        ``b``'s call arguments)."""
        args, kwargs = self.calls[b][index]
        out = block(self.hidden[b] if hidden is None else hidden, *args, **kwargs)
        self.as_tuple = isinstance(out, tuple)
        return out[0] if self.as_tuple else out

    def forward(self, block: nn.Module, index: int, update: bool) -> None:
        """Run every batch through ``block``; with ``update`` its outputs replace the inputs."""
        for b in range(len(self.hidden)):
            out = self.run(block, index, b)
            if update:
                if not torch.isfinite(out).all():
                    raise PrunellaError(self.locate_non_finite(block, index, b))
                self.hidden[b] = out

    def locate_non_finite(self, block: nn.Module, index: int, b: int) -> str:
        """Name the first module of ``block`` whose output is NaN or Inf on batch ``b``."""
        found: list[str] = []

        def hook(name):
            def check(module, args, out):
                out = out[0] if isinstance(out, tuple) else out
                if not found and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                    found.append(name)

            return check

        handles = [m.register_forward_hook(hook(n)) for n, m in block.named_modules() if n]
        try:
            self.run(block, index, b)
        finally:
            for handle in handles:
                handle.remove()
        where = f", first in {found[0]}" if found else ""
        return f"NaN or Inf activations in block {index}{where}: the model is numerically broken"


def run_in_lockstep(
    acts: Activations,
    block: nn.Module,
    index: int,
    linears: dict[str, nn.Module],
    arrive: Callable[[str, nn.Module, torch.Tensor], None],
    complete: Callable[[str, nn.Module], None],
    resume: Callable[[str, nn.Module, torch.Tensor], None],
) -> None:
    """Run every batch through ``block`` once, the batches meeting at each linear layer.

    Each batch's forward runs in a greenlet (a coroutine on this same thread), and
    the batches take turns: when a batch reaches a linear layer, ``arrive(name,
    layer, x)`` sees its input and the batch yields to the next one; once the last
    batch has arrived, ``complete(name, layer)`` runs (the layer is pruned), and
    every batch goes on in turn, calling ``resume(name, layer, x)`` with the pruned
    layer in place. The outputs replace ``acts.hidden``. This is one forward pass
    in which every layer sees all the calibration tokens, coming from the
    already-pruned layers before it, with the memory of one batch's temporaries
    plus what each waiting batch holds.
    """
    from greenlet import getcurrent, greenlet

    scheduler = getcurrent()
    count = len(acts.hidden)
    arrivals: dict[str, int] = dict.fromkeys(linears, 0)

    def meet(name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            arrive(name, module, args[0])
            arrivals[name] += 1
            if arrivals[name] == count:
                complete(name, module)
            scheduler.switch()  # let the other batches reach this layer
            resume(name, module, args[0])

        return pre_hook

    def forward(b: int) -> None:
        out = acts.run(block, index, b)
        if not torch.isfinite(out).all():
            raise PrunellaError(acts.locate_non_finite(block, index, b))
        acts.hidden[b] = out

    handles = [m.register_forward_pre_hook(meet(n)) for n, m in linears.items()]
    try:
        batches = [greenlet(forward, parent=scheduler) for _ in range(count)]
        started = [False] * count
        while not all(g.dead for g in batches):
            for b, g in enumerate(batches):
                if not g.dead:
                    g.switch(*((b,) if not started[b] else ()))
                    started[b] = True
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture(
    model: nn.Module,
    blocks: nn.ModuleList,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Activations:
    """Hidden states entering block 0 and every block's call arguments, per batch."""
    originals = list(blocks)
    hidden, calls = [], []
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        for b in range(0, len(windows), batch_size):
            batch_calls: list = [None] * len(originals)
            for i in range(len(originals)):
                blocks[i] = _Recorder(i, batch_calls, last=i == len(originals) - 1)
            with on_device(model, device, dtype), contextlib.suppress(_StopForward):
                model(input_ids=windows[b : b + batch_size].to(device), use_cache=False)
            if any(call is None for call in batch_calls):
                raise RuntimeError("capture did not reach every block")
            hidden.append(batch_calls[0][0])
            calls.append([(args, kwargs) for _, args, kwargs in batch_calls])
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        model.config.use_cache = use_cache
    return Activations(hidden, calls)


@torch.no_grad()
def visit_blocks(
    store,
    visit: Callable[[str, dict], None],
    *,
    needs: frozenset[str] = frozenset(),
    read: bool = True,
    windows: torch.Tensor | None = None,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "measuring",
) -> None:
    """Call ``visit(prefix, {name: (weight, stats)})`` for every block of the *dense* model.

    With ``needs``, the calibration ``windows`` flow through the dense blocks (no
    pruning) and each layer's statistics are gathered on the way; without, no
    forward pass runs and ``stats`` is ``None``. Without ``read`` (and ``needs``)
    the blocks are not loaded: the weights may be on the meta device, shapes only.
    """
    dtype, matmul_dtype = forward_precision(dtype, device)
    blocks = store.blocks()
    acts = capture(store.model, blocks, windows, batch_size, device, dtype) if needs else None
    for i in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress):
        prefix = f"{store.adapter.blocks_path}.{i}."
        if not (read or needs):  # shapes only
            linears = store.adapter.linears(blocks[i])
            visit(prefix, {prefix + n: (get_weight(m), None) for n, m in linears.items()})
            continue
        with loaded(store, i, device, dtype) as (block, linears):
            stats = {}
            if needs:
                with (
                    StatsCollector(linears, needs) as collector,
                    matmuls_in(matmul_dtype, device),
                    routed(block),
                ):
                    acts.forward(block, i, update=True)
                stats = collector.stats
            visit(prefix, {prefix + n: (get_weight(m), stats.get(n)) for n, m in linears.items()})


@contextlib.contextmanager
def loaded(
    store, i: int, device: torch.device, dtype: torch.dtype, weight_of: WeightOf | None = None
) -> Iterator[tuple[nn.Module, dict[str, nn.Module]]]:
    """Block ``i`` read from ``store``, run on ``device`` in ``dtype`` (:func:`on_device`),
    each prunable layer ``name`` running ``weight_of(name, W)`` (``None``: its own ``W``);
    yields the block and its prunable layers, and releases the block on exit."""
    block = store.load(i)
    try:
        with on_device(block, device, dtype):
            layers = store.adapter.linears(block)
            restores = []
            try:
                if weight_of is not None:
                    prefix = f"{store.adapter.blocks_path}.{i}."
                    for local, layer in layers.items():
                        weight = weight_of(prefix + local, get_weight(layer))
                        if weight is not None:
                            restores.append(swap_in(layer, weight.to(device)))
                yield block, layers
            finally:
                for restore in reversed(restores):
                    restore()
    finally:
        store.release(i)


def swap_in(layer: nn.Module, weight: torch.Tensor) -> Callable[[], None]:
    """Make ``layer`` run with ``weight`` (``[out, in]``); returns what puts its own back.

    A layer's parameter is swapped (no copy); an expert's matrix, a view into the
    fused experts parameter, is overwritten and restored from a copy."""
    if "weight" not in layer._parameters:  # an expert of fused experts
        view = get_weight(layer)
        old = view.detach().clone()
        view.data.copy_(weight)
        return lambda: view.data.copy_(old)
    old = layer._parameters["weight"]
    new = weight.t() if get_weight(layer) is not old else weight  # Conv1D stores W^T
    layer._parameters["weight"] = nn.Parameter(new.to(old.dtype), requires_grad=False)
    return lambda: layer._parameters.__setitem__("weight", old)


@torch.no_grad()
def propagate(
    store,
    windows: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    weight_of: WeightOf | None = None,
    entering: list | None = None,
) -> Activations:
    """The activations leaving the last block (``acts.hidden``, per batch of ``windows``),
    each prunable layer running ``weight_of(name, W)`` (``None``: its own weight). With
    ``entering``, the hidden states entering every block are appended to it."""
    dtype, matmul_dtype = forward_precision(dtype, device)
    blocks = store.blocks()
    acts = capture(store.model, blocks, windows, batch_size, device, dtype)
    for i in range(len(blocks)):
        if entering is not None:
            entering.append(list(acts.hidden))
        with (
            loaded(store, i, device, dtype, weight_of) as (block, _),
            matmuls_in(matmul_dtype, device),
        ):
            acts.forward(block, i, update=True)
    return acts


class _Given(nn.Module):
    """Stands in for a block when logits are made from known final hidden states: the
    first returns them, the others pass their input on."""

    def __init__(self, given: list, as_tuple: bool) -> None:
        super().__init__()
        self.given, self.as_tuple = given, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.given.pop() if self.given else hidden_states
        return (out,) if self.as_tuple else out  # as the real blocks return it


class _Stop(Exception):
    """Ends a forward pass once what it was run for is known."""


@torch.no_grad()
def run_through(model: nn.Module, last: nn.Module, *args, **kwargs) -> tuple[torch.Tensor, bool]:
    """``model(*args, **kwargs)`` up to and including the block ``last``; the final norm
    and the LM head (vocabulary-sized logits) do not run. Returns ``last``'s hidden
    states and whether the blocks return tuples."""
    seen = []

    def stop(module, args, output):
        seen.append(output)
        raise _Stop

    handle = last.register_forward_hook(stop)
    try:
        model(*args, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("internal: the model's forward did not reach its last block")
    as_tuple = isinstance(seen[0], tuple)
    return (seen[0][0] if as_tuple else seen[0]), as_tuple


@contextlib.contextmanager
def given_hidden(
    model: nn.Module, blocks: nn.ModuleList, device, dtype: torch.dtype | None = None,
    as_tuple: bool = False,
):  # fmt: skip
    """Yields ``log_probs(ids, hidden)``: ``log p(v | x_<t)`` (float32, ``[batch, seqlen - 1,
    vocab]``) made from the hidden states leaving the last block by the model's own final
    norm and LM head, as the model runs now (every block stood in for by :class:`_Given`;
    ``hidden`` moved to ``device`` and ``dtype``)."""
    originals = list(blocks)
    given: list = []

    def log_probs(ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        given.append(hidden.to(device=device, dtype=dtype or hidden.dtype))
        logits = model(input_ids=ids.to(device), use_cache=False).logits[:, :-1]
        return F.log_softmax(logits.float(), dim=-1)

    try:
        for i in range(len(originals)):
            blocks[i] = _Given(given, as_tuple)
        yield log_probs
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


@contextlib.contextmanager
def head_only(
    model: nn.Module, blocks: nn.ModuleList, device: torch.device, dtype: torch.dtype,
    as_tuple: bool = False,
):  # fmt: skip
    """:func:`given_hidden` with the model on ``device`` in the precision the forward
    passes run at for ``dtype`` (:func:`forward_precision`)."""
    run_dtype, matmul_dtype = forward_precision(dtype, device)
    with (  # the blocks stood in for first, so that only the rest moves to the device
        given_hidden(model, blocks, device, run_dtype, as_tuple) as log_probs,
        on_device(model, device, run_dtype),
        matmuls_in(matmul_dtype, device),
    ):
        yield log_probs


def next_token_loss(log_probs, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Sum over ``ids``' windows of ``-sum_t log p(x_t | x_<t)`` (divide by
    :func:`predicted_tokens` for the mean), from the final ``hidden`` states."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for window, h in zip(ids.split(1), hidden.split(1), strict=True):
        lp = log_probs(window, h)
        target = window[:, 1:].to(lp.device)
        total = total - lp.gather(-1, target[..., None]).sum()
    return total


def predicted_tokens(ids: torch.Tensor) -> int:
    return ids.shape[0] * (ids.shape[1] - 1)
