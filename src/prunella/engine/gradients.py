"""Gradients of the model's language-model loss, back-propagated one block at a time.

``ecoflap``, ``layerif`` and ``lua`` decide the allocation from how the whole
model's next-token loss ``L = -(1/T) sum_t log p(x_t | x_<t)`` responds to its
layers. :func:`block_gradients` gives the per-window gradients of that loss with
respect to every prunable weight. The forward (:func:`~prunella.engine.forward.propagate`)
keeps only the hidden states entering each block (``blocks x tokens x hidden``);
the backward loads one block, recomputes its forward with autograd, and sends
``dL/dh`` one block down. Peak memory is one block in float32 and its activations
for one window, plus the boundaries: gradient checkpointing at block granularity,
which is also what lets a streamed model be differentiated.

Everything runs in float32, whatever the model's dtype: a gradient dot product
(LayerIF) would drown in bfloat16 rounding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .adapters import get_weight
from .forward import WeightOf, head_only, loaded, next_token_loss, predicted_tokens, propagate


def block_gradients(
    store,
    windows: torch.Tensor,
    *,
    device: torch.device,
    weight_of: WeightOf | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(i, {layer: G})`` for each block ``i``, last block first: ``G[j]`` is the
    gradient of window ``j``'s mean next-token loss with respect to the layer's weight
    (float32, CPU, ``[windows, out, in]``). With ``weight_of(name, W)``, a layer runs
    with the weight it returns (``None``: its own), and the gradient is with respect to
    that weight. The model itself is unchanged.

    Held at once: the hidden states entering every block, one block's gradients for all
    windows, and one window's activations inside one block.
    """
    blocks = store.blocks()
    prefix = f"{store.adapter.blocks_path}."
    store.load_head()
    entering: list[list[torch.Tensor]] = []
    acts = propagate(
        store, windows, device=device, dtype=torch.float32, batch_size=1,
        weight_of=weight_of, entering=entering,
    )  # fmt: skip
    upstream = []
    with head_only(store.model, blocks, device, torch.float32, acts.as_tuple) as log_probs:
        for j in range(len(windows)):
            final = acts.hidden[j].detach().requires_grad_(True)
            loss = next_token_loss(log_probs, windows[j : j + 1], final)
            upstream.append(
                torch.autograd.grad(loss / predicted_tokens(windows[j : j + 1]), final)[0]
            )
    for i in reversed(range(len(blocks))):
        with loaded(store, i, device, torch.float32, weight_of) as (block, layers):
            params = _layer_params(layers)
            stacked: dict[str, torch.Tensor] = {}
            for j in range(len(windows)):
                x = entering[i][j].detach().requires_grad_(True)
                flags = [p.requires_grad for p in params.values()]
                with torch.enable_grad():
                    for p in params.values():
                        p.requires_grad_(True)
                    try:
                        out = acts.run(block, i, j, x)
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
