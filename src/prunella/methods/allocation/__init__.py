"""Allocation: how much each block, layer or row loses, on every axis.

An allocation method is one module (see :mod:`prunella.registry`) with ``PAPER``,
``NEEDS`` (shapes only, the weights, calibration statistics, the loss, the KL
fitness), ``OPTIONS`` and one hook, ``allocate(run, **options)`` (the protocol:
:mod:`prunella.methods.allocation.run`): it returns per-unit scores, then mapped by
its ``ratios(metric, target, sizes, **options)`` around the target (it declares the
metric's name as ``METRIC``), or a finished assignment (the searches, Lua). Third-party
methods register through the ``prunella.allocations`` entry point group.
"""

from __future__ import annotations

from ...registry import Registry
from . import (
    alphapruning,
    dsa,
    ecoflap,
    erk,
    evopress,
    expert_usage,
    layerif,
    lua,
    lwq,
    owl,
    tpe,
    uniform,
)

ALLOCATIONS = Registry(
    "allocation",
    "prunella.allocations",
    {
        "uniform": uniform,
        "owl": owl,
        "alphapruning": alphapruning,
        "erk": erk,
        "evopress": evopress,
        "tpe": tpe,
        "dsa": dsa,
        "expert_usage": expert_usage,
        "ecoflap": ecoflap,
        "layerif": layerif,
        "lua": lua,
        "lwq": lwq,
    },
    hooks=(("METRIC", "allocate", "ratios"), ("allocate",)),
)
