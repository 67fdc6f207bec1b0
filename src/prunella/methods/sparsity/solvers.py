"""The sparsity axis's solvers, registered by name (see :mod:`prunella.methods.sparsity`);
third-party solvers register through the ``prunella.solvers`` entry point group."""

from __future__ import annotations

from ...registry import Method, Registry
from . import alps, magnitude, random, sparsegpt, wanda

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
Solver = Method


def get_solver(name: str) -> Solver:
    return SOLVERS.get(name)
