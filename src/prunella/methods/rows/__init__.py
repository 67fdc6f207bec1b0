"""Row budgets: how a layer's sparsity is spread over its output rows, registered by name.

A row method sits between the engine and the solver: it receives one layer's
weight, its pattern (the layer's share of the allocation) and statistics, and
``solve(weight, pattern) -> (weight, facts)``, which runs the chosen solver; it
returns the pruned weight and its own facts. ``uniform`` leaves the choice to the
solver; ``trim`` searches a count per row (a
:class:`~prunella.methods.sparsity.patterns.RowBudget`) that the solver then honours. Each is one
module with ``PAPER``, ``NEEDS``, ``OPTIONS`` and ``prune`` (see
:mod:`prunella.registry`); third parties register through ``prunella.rows``.
"""

from __future__ import annotations

from ...registry import Method, Registry
from . import trim, uniform

ROWS = Registry("rows", "prunella.rows", {"uniform": uniform, "trim": trim}, hooks=("prune",))


def get_rows(name: str) -> Method:
    return ROWS.get(name)
