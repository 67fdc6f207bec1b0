"""The bits axis's quantizers, registered by name (see :mod:`prunella.methods.bits`);
third-party quantizers register through the ``prunella.quantizers`` entry point group."""

from __future__ import annotations

from ...registry import Registry
from . import gptq, rtn, sparsegpt

QUANTIZERS = Registry(
    "quantizer",
    "prunella.quantizers",
    {"rtn": rtn, "gptq": gptq, "sparsegpt": sparsegpt},
    hooks=("quantize",),
)
