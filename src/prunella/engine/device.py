"""Where and in what precision the work runs: device, forward dtype, peak memory."""

from __future__ import annotations

import resource

import torch

from ..errors import PrunellaError

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise PrunellaError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrunellaError("--device cuda was asked for but no CUDA GPU is available")
    return device


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_compute_dtype(
    model_dtype: torch.dtype, device: torch.device, requested: str = "auto"
) -> torch.dtype:
    """The dtype of the calibration forward passes; the solvers' maths is float32 always.

    ``auto``: the model's own dtype on a GPU; on a CPU, bfloat16 where the CPU
    multiplies it natively (about 3x float32's GEMM speed on AVX512-BF16), else
    float32, since emulated half precision is slow. On a CPU a narrower dtype applies
    to the matrix products alone, the activations stay float32
    (:func:`prunella.engine.forward.forward_precision`).
    """
    if requested not in COMPUTE_DTYPES:
        raise PrunellaError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {requested!r}")
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return model_dtype
    return torch.bfloat16 if native_bf16() else torch.float32


def eval_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Evaluation runs in the model's own dtype on a GPU and in float32 on CPU."""
    return model_dtype if device.type == "cuda" else torch.float32


def peak_memory_mb(device: torch.device) -> dict:
    """Peak resident memory of this process (and peak CUDA allocation), in MiB."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak
