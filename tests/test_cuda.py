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
