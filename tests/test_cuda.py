"""The CUDA path: the same prune on the GPU as on the CPU (runs where a GPU is present).

Without CUDA these tests are skipped, with that reason in the summary (``-ra``);
CI has no GPU, so the CPU path is the one CI checks.
"""

from __future__ import annotations

import pytest
import torch

import prunella

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]


@pytest.mark.parametrize("solver", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("passes", [1, 2])
def test_gpu_prune_matches_cpu_masks(tiny_llama, solver, passes):
    cpu, _ = prunella.prune(
        tiny_llama,
        solver=solver,
        sparsity=0.5,
        nsamples=4,
        seqlen=64,
        device="cpu",
        passes=passes,
        progress=False,
    )
    gpu, gpu_report = prunella.prune(
        tiny_llama,
        solver=solver,
        sparsity=0.5,
        nsamples=4,
        seqlen=64,
        device="cuda",
        passes=passes,
        progress=False,
    )
    assert gpu_report["device"].startswith("cuda") and "peak_cuda_mb" in gpu_report
    assert all(p.device.type == "cpu" for p in gpu.parameters())  # blocks go back after use
    agree = [
        (p == 0).eq(q == 0).float().mean().item()
        for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True)
    ]
    assert min(agree) > 0.99  # float rounding differs between devices, rarely the mask


def test_gpu_bf16_model_prunes_in_bf16(tmp_path, tokenizer_dir):
    from conftest import build_checkpoint

    src = build_checkpoint(tmp_path / "bf16", "llama", tokenizer_dir, dtype=torch.bfloat16)
    model, report = prunella.prune(
        src, sparsity=0.5, nsamples=4, seqlen=64, device="cuda", progress=False
    )
    assert report["compute_dtype"] == "bfloat16"
    assert abs(report["sparsity"] - 0.5) < 1e-6
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("solver, rows", [("alps", "uniform"), ("sparsegpt", "trim")])
def test_gpu_alps_and_trim_meet_the_budget(tiny_llama, solver, rows):
    model, report = prunella.prune(
        tiny_llama,
        solver=solver,
        rows=rows,
        sparsity=0.7,
        nsamples=4,
        seqlen=64,
        device="cuda",
        progress=False,
    )
    assert report["device"].startswith("cuda")
    assert abs(report["sparsity"] - 0.7) < 1e-3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_gpu_quantizes_like_the_cpu_and_writes_a_loadable_checkpoint(
    tiny_llama, tmp_path, quantizer
):
    from prunella.api import prune_to_dir

    options = dict(bits=4, quantizer=quantizer, nsamples=4, seqlen=64, progress=False)
    cpu, cpu_report = prunella.prune(tiny_llama, device="cpu", **options)
    gpu, report = prunella.prune(tiny_llama, device="cuda", **options)
    assert report["device"].startswith("cuda")
    if quantizer == "rtn":  # no data: the same codes
        assert all(p.equal(q) for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True))
    else:  # GPTQ's error feedback turns float rounding into other codes: the same error
        errors = [sum(r["rel_error"] for r in rep["layers"]) for rep in (cpu_report, report)]
        assert 0.9 < errors[1] / errors[0] < 1.1
    out = tmp_path / "out"
    prune_to_dir(model=str(tiny_llama), out=str(out), device="cuda", **options)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, gpu(ids).logits, rtol=1e-4, atol=1e-4)
