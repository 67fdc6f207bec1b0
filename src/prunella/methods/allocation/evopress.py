"""EvoPress: evolutionary search over the levels of a level database.

Sieberling et al., "EvoPress: Accurate Dynamic Model Compression via Evolutionary
Search", ICML 2025 (IST-DASLab/EvoPress, ``evo_prune_search.py``).

A candidate gives every unit (a layer, or a block with ``--granularity block``) a
level of the :mod:`ladder <prunella.methods.search.levels>`; the search starts from the
uniform allocation (every level 0) and, each generation:

1. *Mutation* (budget-preserving level switch): each of ``offspring`` children
   is the parent with ``min(U{1,3}, U{1,3})`` flips; a flip moves one unit a level
   down and another unit with the same step (in weights) a level up, so the
   number of zeros stays exactly the target's. Duplicates are drawn again.
2. *Multi-stage selection*: stage ``k`` scores the candidates on ``tokens[k]``
   fresh calibration tokens (the same draw for all of them) and keeps the
   ``survivors[k]`` with the lowest KL to the dense model; before the last stage
   the parent joins them (elitism). The last survivor is the next parent.

Bit widths (``--bits B --allocation evopress``) follow ``evo_quant_search.py``: level
``l`` of a layer is its ``l``-th width from the start (a :class:`width ladder
<prunella.methods.search.levels.WidthLadder>`), and since our widths (2, 3, 4, 8) are
not one bit apart, no switch keeps the bits exactly; mutation is the reference's rule for
layers of different sizes (``--group_rule none``): ``min(U{1,3}, U{1,3})`` units a width
up, then random units a width down until the candidate is within the average; a child of
more than 10 changes, or one that adds less than 0.8 of the bits it removes, is drawn
again. The search starts from the fitter's widths at equal ratios (the reference, for a
fractional average, from the best of random mixes).

Defaults are the paper's (``run_prune_search.sh``): 64 offspring, survivors
8, 2, 1 on 2048, 16384 and 65536 tokens; EvoPress runs 400 generations, we run
as many as the budget (``minutes``, ``evaluations``) allows. Where we differ:
stage tokens are whole calibration windows (``round(tokens / seqlen)``, at least
one), where EvoPress truncates its last sequence; the units follow
``--granularity`` (EvoPress searches per layer: use ``--granularity layer``).
"""

from __future__ import annotations

import random

from tqdm.auto import tqdm

from ...engine.stats import FITNESS
from ...errors import PrunellaError
from ...registry import Option
from ..search import SEARCH_OPTIONS, expand, start, unit_levels
from .run import AllocationRun, Assignment

PAPER = (
    "Sieberling et al., EvoPress: Accurate Dynamic Model Compression via Evolutionary "
    "Search, ICML 2025"
)
NEEDS = frozenset({FITNESS})


def _ints(text: str) -> list[int]:
    values = [int(v) for v in str(text).split(",")]
    if not values or min(values) < 1:
        raise ValueError("need positive integers separated by commas")
    return values


OPTIONS = (
    *SEARCH_OPTIONS,
    Option("offspring", int, 64, "children per generation", low=1),
    Option("survivors", str, "8,2,1", "candidates kept after each stage", parse=_ints),
    Option("tokens", str, "2048,16384,65536", "calibration tokens of each stage", parse=_ints),
)
METRIC = None


def mutate(parent: dict[str, int], ranges: dict, rng: random.Random) -> dict[str, int]:
    """The parent with ``min(U{1,3}, U{1,3})`` budget-preserving level switches."""
    child = dict(parent)
    for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
        down = [u for u in child if child[u] - 1 >= ranges[u][0]]
        if not down:
            break
        a = rng.choice(down)
        up = [u for u in child if child[u] + 1 <= ranges[u][1] and ranges[u][2] == ranges[a][2]]
        if not up:
            continue
        b = rng.choice(up)
        child[a] -= 1
        child[b] += 1
    return child


def mutate_widths(parent: dict[str, int], ranges: dict, cost, total: float, rng: random.Random):
    """The parent with ``min(U{1,3}, U{1,3})`` units a level up and then random units a
    level down until its bits (``cost(unit, level)``) are at most ``total``; ``None``
    for a child of more than 10 changes or one adding less than 0.8 of what it removes."""
    child = dict(parent)
    spent = sum(cost(u, level) for u, level in child.items())
    added = removed = 0.0
    changes = min(rng.randint(1, 3), rng.randint(1, 3))
    for _ in range(changes):
        up = [u for u in child if child[u] + 1 <= ranges[u][1]]
        if not up:
            return None
        u = rng.choice(up)
        step = cost(u, child[u] + 1) - cost(u, child[u])
        child[u], spent, added = child[u] + 1, spent + step, added + step
    while spent > total * (1 + 1e-12):
        down = [u for u in child if child[u] - 1 >= ranges[u][0]]
        changes += 1
        if not down or changes > 10:
            return None
        u = rng.choice(down)
        step = cost(u, child[u]) - cost(u, child[u] - 1)
        child[u], spent, removed = child[u] - 1, spent - step, removed + step
    return None if added < 0.8 * removed else child


def allocate(run: AllocationRun, **options) -> Assignment:
    """The allocation EvoPress finds within the budget."""
    survivors, tokens = _ints(options["survivors"]), _ints(options["tokens"])
    if len(survivors) != len(tokens):
        raise PrunellaError("evopress: survivors and tokens need one value per stage each")
    session = start(run, options, {})
    ladder = session.ladder
    ranges = unit_levels(ladder, run.units)
    names = ladder.names
    if ladder.kind == "widths":

        def unit_cost(unit: str, level: int) -> float:
            return sum(ladder.cost(n, level) for n in run.units[unit])

        def child_of(parent: dict[str, int]) -> dict[str, int] | None:
            return mutate_widths(parent, ranges, unit_cost, ladder.total, rng)
    else:

        def child_of(parent: dict[str, int]) -> dict[str, int] | None:
            return mutate(parent, ranges, rng)

    rng = random.Random(options["seed"])
    parent = dict.fromkeys(run.units, 0)
    best = None
    bar = tqdm(desc="evopress", unit="gen", disable=not run.progress)
    try:
        generation = 0
        while not session.spent():
            children: list[dict[str, int]] = []
            tries = 0
            while len(children) < options["offspring"] and tries < 100 * options["offspring"]:
                tries += 1
                child = child_of(parent)
                if child is not None and child != parent and child not in children:
                    children.append(child)
            candidates = children or [parent]
            for stage, (keep, count) in enumerate(zip(survivors, tokens, strict=True)):
                ids = sorted(rng.sample(range(len(run.windows)), run.windows_for(count)))
                if stage == len(tokens) - 1 and parent not in candidates:
                    candidates.append(parent)
                scored = session.evaluator.evaluate(
                    [
                        (
                            f"g{generation}s{stage}c{i}",
                            [expand(run.units, c)[n] for n in names],
                            ids,
                        )
                        for i, c in enumerate(candidates)
                    ]
                )
                order = sorted(range(len(candidates)), key=lambda i: scored[i])[:keep]
                candidates, fitness = [candidates[i] for i in order], [scored[i] for i in order]
            parent, best = candidates[0], fitness[0]
            session.record(best)
            generation += 1
            bar.update()
            bar.set_postfix(kl=f"{best:.4f}", evaluations=session.evaluator.evaluations)
    finally:
        bar.close()
        session.close()
    return Assignment(run.budget().axis, **session.finish(expand(run.units, parent), best))
