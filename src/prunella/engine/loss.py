"""The model's language-model loss, block by block, for the allocations that read it.

``ecoflap``, ``layerif`` and ``lua`` decide the allocation from how the whole
model's next-token loss responds to its layers. Here is what they share:

* :func:`next_token_loss`: ``L = -(1/T) sum_t log p(x_t | x_<t)`` over the windows'
  predicted tokens, from the hidden states leaving the last block (the model's own
  final norm and LM head, one window at a time, so the vocabulary-sized logits of
  one window are the largest buffer);
* :func:`block_gradients`: per-window gradients of that loss with respect to every
  prunable weight, by back-propagation one block at a time. The forward keeps only
  the hidden states entering each block (``blocks x tokens x hidden``); the
  backward loads one block, recomputes its forward with autograd, and sends
  ``dL/dh`` one block down. Peak memory is one block in float32 and its
  activations for one window, plus the boundaries: gradient checkpointing at block
  granularity, which is also what lets a streamed model be differentiated.

Everything runs in float32, whatever the model's dtype: a finite difference of the
loss (ECoFLaP) or a gradient dot product (LayerIF) would drown in bfloat16 rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ..methods.search.fitness import head_only
from ..methods.search.levels import swap_in
from .adapters import get_weight
from .prune import Activations, capture, on_device


def block_output(acts: Activations, block, index: int, b: int, hidden: torch.Tensor):
    """``block``'s output on ``hidden`` with batch ``b``'s call arguments, and whether
    the block returns a tuple."""
    args, kwargs = acts.calls[b][index]
    out = block(hidden, *args, **kwargs)
    return (out[0], True) if isinstance(out, tuple) else (out, False)


def next_token_loss(log_probs, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Sum over ``ids``' windows of ``-sum_t log p(x_t | x_<t)`` (divide by the count of
    predicted tokens for the mean), from the final ``hidden`` states."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for window, h in zip(ids.split(1), hidden.split(1), strict=True):
        lp = log_probs(window, h)
        target = window[:, 1:].to(lp.device)
        total = total - lp.gather(-1, target[..., None]).sum()
    return total


def predicted_tokens(ids: torch.Tensor) -> int:
    return ids.shape[0] * (ids.shape[1] - 1)


def block_gradients(
    store,
    windows: torch.Tensor,
    *,
    device: torch.device,
    weight_of: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(i, {layer: G})`` for each block ``i``, last block first: ``G[j]`` is the
    gradient of window ``j``'s mean next-token loss with respect to the layer's weight
    (float32, CPU, ``[windows, out, in]``). With ``weight_of(name, W)``, a layer runs
    with the weight it returns (``None``: its own), and the gradient is with respect to
    that weight. The model itself is unchanged.

    Back-propagation one block at a time (see the module docstring): held at once are
    the hidden states entering every block, one block's gradients for all windows, and
    one window's activations inside one block.
    """
    blocks = store.blocks()
    prefix = f"{store.adapter.blocks_path}."
    store.load_head()
    acts = capture(store.model, blocks, windows, 1, device, torch.float32)
    entering: list[list[torch.Tensor]] = []
    as_tuple = False
    with torch.no_grad():
        for i in range(len(blocks)):
            entering.append(list(acts.hidden))
            with _running(store, i, device, weight_of) as (block, _):
                for j in range(len(windows)):
                    acts.hidden[j], as_tuple = block_output(acts, block, i, j, acts.hidden[j])
    upstream = []
    with head_only(store.model, blocks, device, torch.float32, as_tuple) as log_probs:
        for j in range(len(windows)):
            final = acts.hidden[j].detach().requires_grad_(True)
            loss = next_token_loss(log_probs, windows[j : j + 1], final)
            upstream.append(
                torch.autograd.grad(loss / predicted_tokens(windows[j : j + 1]), final)[0]
            )
    for i in reversed(range(len(blocks))):
        with _running(store, i, device, weight_of) as (block, layers):
            params = _layer_params(layers)
            stacked: dict[str, torch.Tensor] = {}
            for j in range(len(windows)):
                x = entering[i][j].detach().requires_grad_(True)
                flags = [p.requires_grad for p in params.values()]
                with torch.enable_grad():
                    for p in params.values():
                        p.requires_grad_(True)
                    try:
                        out, _ = block_output(acts, block, i, j, x)
                        grads = torch.autograd.grad(
                            out, [x, *params.values()], upstream[j], allow_unused=True
                        )
                    finally:
                        for p, flag in zip(params.values(), flags, strict=True):
                            p.requires_grad_(flag)
                upstream[j] = grads[0]
                by_param = dict(zip(params, grads[1:], strict=True))
                for local, layer in layers.items():
                    g = _weight_grad(layer, by_param)
                    if local not in stacked:
                        stacked[local] = torch.empty((len(windows), *g.shape))
                    stacked[local][j] = g
            yield i, {f"{prefix}{i}.{local}": g for local, g in stacked.items()}
        entering[i] = []


@contextlib.contextmanager
def _running(store, i: int, device: torch.device, weight_of):
    """Block ``i`` loaded, in float32 on ``device``, its layers running ``weight_of``'s
    weights; yields the block and its prunable layers."""
    block = store.load(i)
    restores = []
    try:
        with on_device(block, device, torch.float32):
            layers = store.adapter.linears(block)
            if weight_of is not None:
                prefix = f"{store.adapter.blocks_path}.{i}."
                for local, layer in layers.items():
                    weight = weight_of(prefix + local, get_weight(layer))
                    if weight is not None:
                        restores.append(swap_in(layer, weight.to(device, torch.float32)))
            try:
                yield block, layers
            finally:
                for restore in reversed(restores):
                    restore()
    finally:
        store.release(i)


def _layer_params(layers: dict) -> dict[int, torch.nn.Parameter]:
    """The parameters holding the layers' weights (a fused experts tensor once)."""
    params = {}
    for layer in layers.values():
        param = _param_of(layer)
        params[id(param)] = param
    return params


def _param_of(layer) -> torch.nn.Parameter:
    experts = getattr(layer, "experts", None)
    if experts is not None:  # an expert's view into a fused parameter
        return getattr(experts, layer.param)
    return layer.weight


def _weight_grad(layer, by_param: dict) -> torch.Tensor:
    """The ``[out, in]`` gradient of one layer, sliced as its weight is."""
    param = _param_of(layer)
    grad = by_param[id(param)]
    if grad is None:
        grad = torch.zeros_like(param)
    with torch.no_grad():
        original = param.data
        param.data = grad  # read the layer's view of the gradient through its own slicing
        try:
            view = get_weight(layer).detach().float().cpu()
        finally:
            param.data = original
    return view
