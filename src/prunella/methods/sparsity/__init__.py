"""Layer-wise solvers, registered by name.

A solver prunes one weight matrix ``W`` (``[out_features, in_features]``, float32)
under a :mod:`pattern <prunella.patterns>`, given the layer statistics it
declares in ``NEEDS``; it returns the new weight (pruned entries exactly zero,
survivors possibly updated) and a dict of facts for the report. A solver is one
module with ``PAPER``, ``NEEDS``, ``OPTIONS`` and ``prune(weight, pattern, stats,
**options)`` (see :mod:`prunella.registry`), and one line below; third-party
solvers register through the ``prunella.solvers`` entry point group.
"""

from __future__ import annotations

from ...registry import Method, Registry
from . import alps, magnitude, random, sparsegpt, wanda

Solver = Method

SOLVERS = Registry(
    "solver",
    "prunella.solvers",
    {
        "magnitude": magnitude,
        "wanda": wanda,
        "sparsegpt": sparsegpt,
        "random": random,
        "alps": alps,
    },
    hooks=("prune",),
)


def get_solver(name: str) -> Solver:
    return SOLVERS.get(name)
