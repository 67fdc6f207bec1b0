"""HEAPr: remove the atomic experts whose removal costs the least, in output space.

Li et al., "HEAPr: Hessian-based Efficient Atomic Expert Pruning in Output Space",
ICLR 2026 (arXiv 2509.22299; reference code LLIKKE/HEAPr).

An *atomic expert* ``(e, k)`` is intermediate neuron ``k`` of expert ``e``: row ``k``
of its gate and up matrices and column ``k`` of its down matrix. On a token ``t``
routed to ``e`` it adds ``o_tk = x_tk w_k`` to the expert's output (``x_tk`` is the
``k``-th input of down, ``w_k`` its ``k``-th column). Removing it changes the loss,
to second order, by ``o_tkᵀ G_e o_tk / 2`` with the output-space Hessian of the
loss approximated by the Fisher ``G_e = E_t[g_t g_tᵀ]`` (``g_t`` the gradient of
the next-token loss with respect to expert ``e``'s output, the router's weight
included). Cross terms between atomic experts vanish in output space, so each is
scored alone:

    S_ek = E_t[x_tk²] · w_kᵀ G_e w_k = E_t[x_tk²] · E_t[(g_t · w_k)²]

(expectations over the calibration tokens routed to ``e``). The atomic experts of
every routed expert of every block are ranked together and the lowest ``ratio``
of them removed (the paper's global ranking). An expert that receives no token
scores -1 and goes first, as in the reference code. Shared experts, attention
and routers are not touched. Defaults are the paper's: 128 windows of 2048
tokens (the paper draws them from WikiText-2; Prunella's default calibration
text is its shipped sample), ratios 0.2 to 0.5 evaluated (``ratio`` 0.25 here).

Where Prunella differs:

* ``w_kᵀ G_e w_k`` is accumulated as ``E_t[(g_t · w_k)²]`` without forming ``G_e``
  (``hidden × hidden`` per expert): the same number, in ``intermediate`` floats
  per expert instead of ``hidden²``.
* One forward and one backward pass per batch: the ``x_tk²`` come from the same
  forward as the gradients. The reference runs its gradient pass in train mode and
  a second forward in eval mode; the two differ only by dropout, which these
  models do not use.
* ``uniform=True`` ranks within each expert and keeps the same number of atomic
  experts in every expert, so the saved experts are genuinely smaller (the
  config's expert intermediate size shrinks). With the default global ranking the
  experts keep different numbers, which transformers' fused expert tensors cannot
  hold: the removed atomic experts are written as zeros (same shapes), and the
  report gives each expert's width.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.experts import expert_views, is_fused_experts, routed
from ..errors import PrunellaError

PAPER = "Li et al., HEAPr: Hessian-based Efficient Atomic Expert Pruning in Output Space, 2025"
WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size", "expert_intermediate_size")


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise PrunellaError(f"the HEAPr ratio must be in [0, 1), got {ratio}")


def expert_width(module: nn.Module) -> int:
    """The experts' intermediate size (atomic experts per expert)."""
    return expert_views(module)["0.down_proj"].weight.shape[1]


@dataclass
class AtomicStats:
    """Sums over the tokens routed to each expert of one experts module."""

    tokens: torch.Tensor  # [E]
    x2: torch.Tensor  # [E, I]: sum_t x_tk^2
    gw2: torch.Tensor  # [E, I]: sum_t (g_t . w_k)^2

    def scores(self) -> torch.Tensor:
        """``S_ek = E_t[x_tk²] · E_t[(g_t · w_k)²]``; -1 for an expert with no token."""
        n = self.tokens.clamp_min(1).unsqueeze(1)
        scores = (self.x2 / n) * (self.gw2 / n)
        return torch.where(self.tokens.unsqueeze(1) > 0, scores, torch.full_like(scores, -1.0))


def heapr_stats(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True
) -> dict[str, AtomicStats]:
    """Experts module name -> its :class:`AtomicStats`, from one forward and one backward
    pass of the next-token loss per batch of calibration ``windows``."""
    experts = {n: m for n, m in model.named_modules() if is_fused_experts(m)}
    if not experts:
        raise PrunellaError("HEAPr prunes mixtures of experts: this model has no fused experts")
    stats: dict[str, AtomicStats] = {}
    handles = []
    for name, module in experts.items():
        width, count = expert_width(module), module.num_experts
        device = expert_views(module)["0.down_proj"].weight.device
        stats[name] = AtomicStats(
            torch.zeros(count, dtype=torch.float64, device=device),
            torch.zeros(count, width, dtype=torch.float64, device=device),
            torch.zeros(count, width, dtype=torch.float64, device=device),
        )
        for e in range(count):
            handles.append(expert_views(module)[f"{e}.down_proj"].register_forward_hook(
                _recorder(stats[name], e)
            ))  # fmt: skip
    # gradients flow to the activations only: no parameter keeps a gradient
    requires = {p: p.requires_grad for p in model.parameters()}
    for param in requires:
        param.requires_grad_(False)
    embed = model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out.requires_grad_()
    )
    try:
        with routed(model), torch.enable_grad():
            for b in tqdm(
                range(0, len(windows), batch_size), desc="HEAPr scores", disable=not progress
            ):
                ids = windows[b : b + batch_size].to(model.device)
                # the next-token loss alone (no router auxiliary loss)
                out = model(input_ids=ids, labels=ids, use_cache=False, output_router_logits=False)
                out.loss.backward()
    finally:
        embed.remove()
        for handle in handles:
            handle.remove()
        for param, flag in requires.items():
            param.requires_grad_(flag)
    return stats


def _recorder(stats: AtomicStats, e: int):
    """A forward hook on expert ``e``'s down matrix: ``x_tk²`` now, ``(g_t · w_k)²`` when
    the gradient of its output arrives."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0].detach()
        stats.tokens[e] += x.shape[0]
        stats.x2[e] += x.double().square().sum(0)
        if out.requires_grad:
            weight = module.weight.detach()

            def grad_hook(g: torch.Tensor) -> None:
                stats.gw2[e] += (g.detach().double() @ weight.double()).square().sum(0)

            out.register_hook(grad_hook)

    return hook


def atomic_keep(
    scores: dict[str, torch.Tensor], ratio: float, uniform: bool = False
) -> dict[str, torch.Tensor]:
    """Experts module name -> ``BoolTensor[E, I]`` of the atomic experts kept: the top
    ``1 - ratio`` of all scores (global), or of each expert's (``uniform``)."""
    check_ratio(ratio)
    if uniform:
        keep = {}
        for name, s in scores.items():
            count = s.shape[1] - round(ratio * s.shape[1])
            mask = torch.zeros_like(s, dtype=torch.bool)
            mask.scatter_(1, s.topk(count, dim=1).indices, True)
            keep[name] = mask
        return keep
    flat = torch.cat([s.flatten() for s in scores.values()])
    count = flat.numel() - round(ratio * flat.numel())
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[flat.topk(count, sorted=False).indices] = True
    keep, start = {}, 0
    for name, s in scores.items():
        keep[name] = chosen[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return keep


@torch.no_grad()
def zero_atomic_experts(module: nn.Module, keep: torch.Tensor) -> None:
    """Zero the removed atomic experts in place: gate and up rows, down columns."""
    views = expert_views(module)
    for e in range(module.num_experts):
        drop = ~keep[e]
        for part in ("gate_proj", "up_proj"):
            if f"{e}.{part}" in views:
                views[f"{e}.{part}"].weight[drop] = 0
                if views[f"{e}.{part}"].bias is not None:
                    views[f"{e}.{part}"].bias[drop] = 0
        views[f"{e}.down_proj"].weight[:, drop] = 0


@torch.no_grad()
def shrink_experts(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only the chosen atomic experts (the same number in every expert): the fused
    tensors get a smaller intermediate size, in the model's own layout."""
    for key, value in shrunk_tensors(module, keep).items():
        setattr(module, key, nn.Parameter(value, requires_grad=False))


@torch.no_grad()
def shrunk_tensors(module: nn.Module, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fused tensors (name in ``module`` -> tensor) of the experts that keep only the
    atomic experts ``keep`` (``[E, I]``, the same number in every expert), in the model's
    own layout; ``module`` is left as it is."""
    views = expert_views(module)
    rows = [keep[e].nonzero().squeeze(1) for e in range(module.num_experts)]

    def fused(part_rows: list[list[torch.Tensor]]) -> torch.Tensor:
        """``[E, parts * k, in]`` from per-expert ``[k, in]`` parts, in the model's layout."""
        per_expert = [
            torch.cat(p) if module.is_concatenated else torch.stack(p, 1).flatten(0, 1)
            for p in part_rows
        ]
        return torch.stack(per_expert)

    parts = ("gate_proj", "up_proj") if module.has_gate else ("up_proj",)
    name = "gate_up_proj" if module.has_gate else "up_proj"
    new = {
        name: fused([[views[f"{e}.{p}"].weight[rows[e]] for p in parts] for e in range(len(rows))]),
        "down_proj": torch.stack(
            [views[f"{e}.down_proj"].weight[:, rows[e]] for e in range(len(rows))]
        ),
    }
    if getattr(module, "has_bias", False):
        new[f"{name}_bias"] = fused(
            [
                [views[f"{e}.{p}"].bias[rows[e]].unsqueeze(1) for p in parts]
                for e in range(len(rows))
            ]
        ).squeeze(-1)
    return {
        key: (value.transpose(1, 2) if module.is_transposed and value.dim() == 3 else value)
        .detach()
        .contiguous()
        for key, value in new.items()
    }


def width_key(config, model: nn.Module, width: int, new_width: int) -> str:
    """The config attribute that sets the experts' intermediate size: the one that, set to
    ``new_width``, changes the experts' shapes and nothing else."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for key in WIDTH_KEYS:
        if getattr(config, key, None) != width:
            continue
        trial = config.__class__.from_dict({**config.to_dict(), key: new_width})
        with init_empty_weights():
            after = {
                n: tuple(p.shape)
                for n, p in AutoModelForCausalLM.from_config(trial).named_parameters()
            }
        changed = {n for n in before if before[n] != after.get(n)}
        if changed and all(".experts." in n for n in changed):
            return key
    raise PrunellaError(
        "cannot write smaller experts for this model (no config field sets only the experts' "
        "intermediate size): use the global ranking (uniform=False), which writes zeros"
    )


def heapr(
    model: nn.Module, windows: torch.Tensor, ratio: float = 0.25, uniform: bool = False,
    batch_size: int = 1, progress: bool = True,
) -> dict:  # fmt: skip
    """Prune ``model`` (in memory) with HEAPr; returns the report. With ``uniform`` the
    experts shrink and the config's expert intermediate size with them."""
    tick = time.perf_counter()
    check_ratio(ratio)
    model.eval()
    modules = dict(model.named_modules())
    if uniform:  # before the scoring: a model whose experts cannot shrink stops here
        experts = next((m for m in modules.values() if is_fused_experts(m)), None)
        if experts is not None:
            width = expert_width(experts)
            key = width_key(model.config, model, width, width - round(ratio * width))
    stats = heapr_stats(model, windows, batch_size, progress)
    keep = atomic_keep({n: s.scores() for n, s in stats.items()}, ratio, uniform)
    expert_params = sum(p.numel() for n in keep for p in modules[n].parameters())
    if uniform:
        new_width = int(next(iter(keep.values()))[0].sum())
        for name, mask in keep.items():
            shrink_experts(modules[name], mask)
        setattr(model.config, key, new_width)
    else:
        for name, mask in keep.items():
            zero_atomic_experts(modules[name], mask)
    removed = sum(int((~m).sum()) for m in keep.values())
    total = sum(m.numel() for m in keep.values())
    return {
        "method": "heapr",
        "paper": PAPER,
        "ratio": ratio,
        "ranking": "per expert (uniform)" if uniform else "global",
        "written_as": "smaller experts" if uniform else "zeros (same shapes)",
        "atomic_experts_removed": removed,
        "atomic_experts": total,
        "expert_parameters_before": expert_params,
        "expert_parameters_after": sum(p.numel() for n in keep for p in modules[n].parameters())
        if uniform
        else expert_params,
        "calibration_tokens": int(windows.numel()),
        "experts": {
            name: {
                "routed_tokens": stats[name].tokens.long().tolist(),
                "width": keep[name].sum(1).tolist(),
            }
            for name in keep
        },
        "seconds": time.perf_counter() - tick,
    }
