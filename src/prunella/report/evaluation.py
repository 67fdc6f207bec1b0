"""Evaluation: perplexity and KL divergence on held-out text, zero-shot tasks via lm-eval.

Perplexity: ``PPL = exp( sum_t -log p(x_t | x_<t) / T )`` over non-overlapping
windows of ``seqlen`` tokens, each window predicted from its own start (the
protocol of the SparseGPT and Wanda papers); ``T`` counts the predicted tokens.

KL to a reference (the dense model): ``KL = (1/T) sum_t sum_v p_ref(v | x_<t)
(log p_ref(v | x_<t) - log p(v | x_<t))``, in nats per token: how far the pruned
model's next-token distribution moved, which shows damage that perplexity hides
at low sparsity.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import check_text_input, check_token_ids, describe, evaluation_windows
from ..engine.device import eval_dtype, pick_device
from ..engine.forward import on_device
from ..errors import PrunellaError
from ..io.models import load


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    reference: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``windows`` (``LongTensor[count, seqlen]``), and KL to
    ``reference`` when given."""
    nll, kl, tokens = 0.0, 0.0, 0
    batches = range(0, len(windows), batch_size)
    for b in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
        ids = windows[b : b + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        logp = F.log_softmax(logits, dim=-1)
        nll -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        if reference is not None:
            ref = F.log_softmax(
                reference(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1
            )
            kl += (ref.exp() * (ref - logp)).sum().item()
        tokens += targets.numel()
    mean = nll / tokens
    result = {
        "perplexity": math.exp(mean),
        "nll": mean,
        "tokens": tokens,
        "windows": len(windows),
        "seqlen": windows.shape[1],
    }
    if reference is not None:
        result["kl_to_reference"] = kl / tokens
    return result


def evaluate(
    model,
    data: str | Path | torch.Tensor = "sample-eval",
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    text_field: str = "text",
    tokenizer=None,
    reference=None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` (a path, a bundled name or a loaded model) on ``data``.

    With ``reference`` (another model, or its path), also the KL divergence from the
    reference's next-token distribution to the model's (``kl_to_reference``, nats per
    token). Models run on ``device`` (in float32 on CPU) without being changed.
    """
    dev = pick_device(device)
    if isinstance(model, str | Path):
        model, tokenizer, _, _ = load(model)
    if isinstance(reference, str | Path):
        reference = load(reference)[0]
    if isinstance(data, torch.Tensor):
        windows = data.long()
    else:
        check_text_input(tokenizer, seqlen, getattr(model.config, "max_position_embeddings", None))
        windows = evaluation_windows(tokenizer, data, seqlen, max_windows, text_field)
    check_token_ids(windows, model)
    with contextlib.ExitStack() as stack:
        for m in (model, reference):
            if m is not None:
                stack.enter_context(on_device(m, dev, eval_dtype(next(m.parameters()).dtype, dev)))
        result = perplexity(
            model,
            windows,
            reference=reference,
            device=dev,
            batch_size=batch_size,
            progress=progress,
        )
    result["data"] = describe(data) if not isinstance(data, torch.Tensor) else "token windows"
    return result


def zero_shot(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    device: str = "cpu",
) -> dict:
    """Zero-shot accuracy on lm-eval ``tasks`` (needs the optional ``lm-eval`` package).

    ``include_path`` adds task definitions from a folder of YAML files (local tasks
    and datasets, which run offline). Returns ``{task: {metric: value}}``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PrunellaError(
            "zero-shot tasks need the lm-eval package: pip install 'prunella[eval]'"
        ) from None
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise PrunellaError(f"unknown lm-eval task {unknown[0]!r} (see 'lm-eval ls tasks')")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False
        )
    except Exception as exc:  # data not reachable, not cached ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunellaError(f"lm-eval could not run {', '.join(tasks)}: {first}") from None
    return {
        task: {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, int | float) and not k.startswith("alias")
        }
        for task, metrics in out["results"].items()
    }
