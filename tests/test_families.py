"""Every supported architecture prunes end to end and reloads with transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, build_checkpoint
from transformers import AutoModelForCausalLM

import prunella
from prunella.adapters import adapter_for, get_weight


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_reload(family, tmp_path, tokenizer_dir):
    src = build_checkpoint(tmp_path / "src", family, tokenizer_dir)
    model, report = prunella.prune(
        src, sparsity=0.5, solver="sparsegpt", nsamples=4, seqlen=64, progress=False
    )
    out = prunella.save(model, tmp_path / "out", report)
    saved = json.loads((out / "prune_report.json").read_text())
    assert saved["architecture"] == family
    assert abs(saved["sparsity"] - 0.5) < 1e-3

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    adapter = adapter_for(family)
    names = set()
    for i, block in enumerate(adapter.blocks(reloaded)):
        for local, layer in adapter.linears(block).items():
            w = get_weight(layer)
            k = round(0.5 * w.numel())
            assert (w == 0).sum().item() == k, f"{family} {i} {local}"
            names.add(f"{adapter.blocks_path}.{i}.{local}")
    assert names == {layer["name"] for layer in saved["layers"]}
    # the reloaded checkpoint is the pruned model, weight for weight
    pruned_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert pruned_state.keys() == reloaded_state.keys()
    for name, tensor in pruned_state.items():
        assert torch.equal(tensor, reloaded_state[name]), name
