"""Every architecture (found by discovery, not from a list) prunes end to end and reloads
with transformers, mixtures of experts included (more in test_experts)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, build_checkpoint, tiny_config
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import prunella
from prunella.cli import main
from prunella.engine.adapters import adapter_for, get_weight
from prunella.errors import PrunellaError


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
    adapter = adapter_for(reloaded)
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


def test_fused_experts_of_an_unknown_layout_are_refused():
    """A tool that prunes only nn.Linear would leave such experts dense, silently."""

    class Slabs(torch.nn.Module):  # DBRX-like: experts fused in a layout Prunella cannot read
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.zeros(4 * 32, 64))

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.model.layers[1].mlp.experts = Slabs()
    with pytest.raises(PrunellaError, match=r"'llama': its experts are fused parameters "
                       r"\(model\.layers\.1\.mlp\.experts\.w1\) in a layout"):  # fmt: skip
        adapter_for(model)


def test_discovery_finds_the_blocks_wherever_they_are(tmp_path, tokenizer_dir):
    paths = {}
    for family in ("llama", "opt", "gpt2", "gpt_neox", "mpt", "falcon", "bloom"):
        model = AutoModelForCausalLM.from_config(tiny_config(family))
        adapter = adapter_for(model)
        paths[family] = adapter.blocks_path
        assert len(adapter.blocks(model)) == 3 and adapter.family == family
    assert paths == {
        "llama": "model.layers",
        "opt": "model.decoder.layers",
        "gpt2": "transformer.h",
        "gpt_neox": "gpt_neox.layers",
        "mpt": "transformer.blocks",
        "falcon": "transformer.h",
        "bloom": "transformer.h",
    }


def test_discovery_without_no_split_modules_takes_the_largest_block_list():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model._no_split_modules = None
    model.model.extra = torch.nn.ModuleList([torch.nn.Linear(4, 4)])  # a smaller list
    assert adapter_for(model).blocks_path == "model.layers"


def test_discovery_takes_a_mixed_block_list_over_the_lists_inside_it():
    """A hybrid stack (two kinds of blocks) with experts kept as a list inside each."""
    from types import SimpleNamespace

    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])

    class Mixer(Attention):
        pass

    class Hybrid(nn.Module):
        config = SimpleNamespace(model_type="hybrid", is_encoder_decoder=False)

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Attention(), Mixer(), Attention()])

    assert adapter_for(Hybrid()).blocks_path == "layers"


def test_linear_layers_outside_the_blocks_are_the_lm_head_only():
    for family in FAMILIES:
        model = AutoModelForCausalLM.from_config(tiny_config(family))
        adapter = adapter_for(model)
        inside = {id(m) for block in adapter.blocks(model) for m in block.modules()}
        outside = [
            m
            for m in model.modules()
            if isinstance(m, torch.nn.Linear | Conv1D) and id(m) not in inside
        ]
        assert outside in ([], [model.get_output_embeddings()]), family


def test_non_causal_models_are_refused_in_one_line(tmp_path, capsys):
    from transformers import BartConfig, BertConfig, T5Config

    configs = {
        "t5": (T5Config(d_model=32, num_layers=1), "unsupported architecture 't5'"),
        "bart": (BartConfig(d_model=32, encoder_layers=1, decoder_layers=1), "encoder-decoder"),
        "bert": (BertConfig(), "bidirectional attention"),
    }
    for name, (config, reason) in configs.items():
        folder = tmp_path / name
        folder.mkdir()
        config.save_pretrained(folder)
        assert main(["prune", str(folder), "--out", str(tmp_path / "out")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err[-1].startswith(f"error: unsupported architecture {name!r}"), err
        assert reason in err[-1], err
