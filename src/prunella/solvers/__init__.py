"""Layer-wise solvers, registered by name.

A solver prunes one weight matrix ``W`` (``[out_features, in_features]``, float32)
under a :mod:`pattern <prunella.patterns>`, given the layer statistics it
declares in ``NEEDS``; it returns the new weight (pruned entries exactly zero,
survivors possibly updated) and a dict of facts for the report. Adding a solver
means adding one module with ``NEEDS`` and ``prune`` and one line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from ..errors import PrunellaError
from . import magnitude, sparsegpt, wanda


@dataclass(frozen=True)
class Solver:
    name: str
    needs: frozenset[str]
    prune: Callable


def _register(name: str, module: ModuleType) -> Solver:
    return Solver(name, module.NEEDS, module.prune)


SOLVERS: dict[str, Solver] = {
    "magnitude": _register("magnitude", magnitude),
    "wanda": _register("wanda", wanda),
    "sparsegpt": _register("sparsegpt", sparsegpt),
}


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise PrunellaError(
            f"unknown solver {name!r}; choose one of: {', '.join(SOLVERS)}"
        ) from None
