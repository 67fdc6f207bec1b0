"""The sequential engine: prune a model block by block on calibration data.

1. *Capture*: run the model on the calibration windows with every decoder block
   replaced by a recorder, which keeps the hidden states entering block 0 and
   the exact arguments the model passes each block (attention masks, rotary
   embeddings, position ids), then stops before the LM head.
2. For each block ``i``, with only that block on the compute device:
   a. *statistics*: forward the block's inputs through the dense block with
      hooks that accumulate what the solver declares (Hessian, input norms);
   b. *solve*: prune every linear layer of the block with the solver;
   c. *propagate*: forward the inputs through the pruned block; the outputs,
      written over the inputs, are block ``i+1``'s inputs. The relative
      reconstruction error ``||(W - W_hat) X|| / ||W X||`` of each layer is
      measured here, on its first ``error_tokens`` input tokens.

Solvers that need no statistics (magnitude) skip step (a). Calibration windows
are processed in batches of ``batch_size`` windows; the activations of all
windows for the current block are the only large buffer. Blocks come from a
:mod:`store <prunella.store>` (in memory or streamed from disk), which the
engine asks to load each block before it and release it after.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunellaError
from ..methods.rows import get_rows
from ..methods.sparsity import Solver, get_solver
from ..methods.sparsity.patterns import Pattern
from ..registry import Method
from .adapters import get_weight, set_weight
from .experts import ExpertLinear, routed
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

    def run(self, block: nn.Module, index: int, b: int) -> torch.Tensor:
        args, kwargs = self.calls[b][index]
        out = block(self.hidden[b], *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

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
        if take > 0:
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
    pattern: str
    target_sparsity: float
    sparsity: float
    rel_error: float
    info: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The report row: name, shape, pattern, target and achieved sparsity, error, info."""
        row = {k: v for k, v in self.__dict__.items() if k != "info"}
        return {**row, "shape": list(self.shape), **self.info}


@dataclass
class BlockPruner:
    """Prunes the linear layers of one block at a time, in one or two passes."""

    patterns: dict[str, Pattern]
    solver: Solver
    options: dict
    error_tokens: int
    one_pass: bool
    timings: dict[str, float]
    rows: Method
    rows_options: dict
    expert_min_tokens: int = 0

    @property
    def needs(self) -> frozenset[str]:
        """The statistics the solver and the row method read."""
        return self.solver.needs | self.rows.needs

    def solve(self, name: str, layer: nn.Module, stats, master: torch.Tensor) -> tuple:
        """Prune ``master`` (the checkpoint's weight of ``layer``) in place, and the copy
        ``layer`` runs with; return the dense weight (float32) and the solver's (and the
        row method's) facts.

        The solver starts from ``master`` at full precision, never from the forward's
        copy, which may be narrower (bfloat16 on CPU).
        """
        tick = time.perf_counter()
        running = get_weight(layer)
        dense = master.detach().to(device=running.device, dtype=torch.float32, copy=True)
        if not torch.isfinite(dense).all():
            raise PrunellaError(f"layer {name} has NaN or Inf weights")

        # an expert routed too few tokens for statistics: a data-free solver, uniform rows
        few = isinstance(layer, ExpertLinear) and stats is not None
        few = few and stats.tokens < self.expert_min_tokens
        solver, options = (get_solver("magnitude"), {}) if few else (self.solver, self.options)
        rows, rows_options = (get_rows("uniform"), {}) if few else (self.rows, self.rows_options)

        def run_solver(weight: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, dict]:
            return solver.prune(weight, pattern, stats, **options)

        with exact(dense):
            new, info = rows.prune(
                dense.clone(), self.patterns[name], stats, run_solver, **rows_options
            )
        if few:
            info["note"] = (
                f"the router sent this expert {stats.tokens} calibration tokens "
                f"(fewer than {self.expert_min_tokens}): pruned by magnitude"
            )
        # Round to the checkpoint's dtype now, so that what follows is calibrated on
        # exactly the weights that will be saved.
        master.copy_(new)
        if running.data_ptr() != master.data_ptr():
            set_weight(layer, master)
        # With one pass every batch waits here holding its activations: give back the
        # pages of the holes their temporaries left in the heap (see prunella.heap).
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
                pattern=str(self.patterns[prefix + local]),
                target_sparsity=self.patterns[prefix + local].sparsity,
                sparsity=(weight == 0).sum().item() / weight.numel(),
                rel_error=probe.relative_error(local),
                info=info[local] | routed_tokens(local),
            )
            for local, weight in masters.items()
        ]


@torch.no_grad()
def prune_blocks(
    store,
    windows: torch.Tensor,
    patterns: dict[str, Pattern],
    solver: Solver,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    solver_options: dict | None = None,
    rows: Method | None = None,
    rows_options: dict | None = None,
    error_tokens: int = 2048,
    progress: bool = True,
    start: int = 0,
    hidden: list[torch.Tensor] | None = None,
    after_block: Callable[[int, Activations, list[LayerResult]], None] | None = None,
    one_pass: bool = False,
    expert_min_tokens: int = 0,
) -> tuple[list[LayerResult], dict[str, float]]:
    """Prune every linear layer named in ``patterns``, block by block, in place, with
    ``solver`` under the row budgets of ``rows`` (:mod:`prunella.rows`; default uniform).

    ``store`` holds the model (:mod:`prunella.store`): each block is loaded before
    it is pruned and released after ``after_block(i, activations, results)`` has run
    (to save progress). ``start`` and ``hidden`` resume at a block with its saved
    inputs. Returns one :class:`LayerResult` per pruned layer and the seconds spent
    per phase (``read`` is the time the store took to load blocks).

    ``one_pass``: instead of a statistics pass over the dense block and a second
    pass over the pruned one (the papers' protocol), run the batches through the
    block once, in lockstep (:func:`run_in_lockstep`), pruning each layer when all
    its inputs have arrived; every layer is then calibrated on the outputs of the
    pruned layers before it, and the block's outputs need no second pass.

    Fused experts run through their views (:func:`prunella.experts.routed`): each
    expert's matrices are layers, calibrated on the tokens routed to that expert; an
    expert with fewer than ``expert_min_tokens`` of them is pruned by magnitude.
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
    pruner = BlockPruner(
        patterns,
        solver,
        solver_options or {},
        error_tokens,
        one_pass,
        timings,
        rows or get_rows("uniform"),
        rows_options or {},
        expert_min_tokens,
    )
    blocks_path = store.adapter.blocks_path

    results: list[LayerResult] = []
    bar = tqdm(
        range(start, len(blocks)),
        desc=f"pruning ({solver.name}, {pruner.rows.name} rows)",
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
            if prefix + local in patterns
        }
        # The pruned weights go straight into the checkpoint's tensors (in its dtype);
        # the block runs on a copy when it moves device or dtype.
        masters = {local: get_weight(layer) for local, layer in linears.items()}
        with on_device(block, device, dtype), matmuls_in(matmul_dtype, device), routed(block):
            block_results = pruner(i, block, prefix, acts, linears, masters)
        trim_heap()  # give back what this block's temporaries held (see prunella.heap)
        results.extend(block_results)
        if after_block is not None:
            after_block(i, acts, block_results)
        store.release(i)
    return results, timings


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
    load = read or bool(needs)
    for i in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress):
        block = store.load(i) if load else blocks[i]
        linears = store.adapter.linears(block)
        prefix = f"{store.adapter.blocks_path}.{i}."
        with on_device(block, device, dtype) if load else contextlib.nullcontext():
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
        if load:
            store.release(i)
