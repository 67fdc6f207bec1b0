"""EvoPress's depth search: which blocks to remove, by evolution on the KL fitness.

Sieberling et al., "EvoPress: Accurate Dynamic Model Compression via Evolutionary
Search", ICML 2025 (IST-DASLab/EvoPress, ``evo_drop_search.py`` with
``--drop_entire_block``, the defaults of ``scripts/run_drop_search.sh``). The search
keeps the number of removed blocks ``d`` (and so the width the budget leaves) and looks
for *which* ``d`` blocks go:

1. the initial population: ``initially_generated`` (64) random sets of ``d`` blocks and
   ShortGPT's set, scored on the first stage's tokens; the best is the parent;
2. each generation, ``offspring`` (32) children of the parent, each with
   ``min(U{1,3}, U{1,3})`` swaps of a removed block for a kept one (duplicates drawn
   again);
3. selection in stages: the children scored on ``tokens[0]`` calibration tokens, the best
   ``survivors[0]`` (2) kept; then, with the parent (elitism), on ``tokens[1]`` tokens,
   the best one is the next parent.

The paper runs ``d (n - d) / 1.5`` generations on 2048 and 32768 tokens; we run as many
generations as ``minutes`` (or ``evaluations``) allow, and the stages' tokens are whole
calibration windows, at most the ``--fitness-tokens`` the candidates were compared on
(the dense model's last hidden states on them are kept, not its logits).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

PAPER = (
    "Sieberling et al., EvoPress: Accurate Dynamic Model Compression via Evolutionary "
    "Search, ICML 2025 (depth pruning, evo_drop_search.py)"
)
OFFSPRING, INITIAL, SURVIVORS, MAX_SWAPS = 32, 64, (2, 1), 3


def mutate(removed: tuple[int, ...], blocks: int, rng: random.Random) -> tuple[int, ...]:
    """``min(U{1,3}, U{1,3})`` swaps of a removed block for a kept one."""
    gone = set(removed)
    for _ in range(min(rng.randint(1, MAX_SWAPS), rng.randint(1, MAX_SWAPS))):
        back = rng.choice(sorted(gone))
        out = rng.choice([i for i in range(blocks) if i not in gone])
        gone = (gone - {back}) | {out}
    return tuple(sorted(gone))


def search(
    fitness: Callable[[tuple[int, ...], int], float],
    start: tuple[int, ...],
    blocks: int,
    stages: tuple[int, int],
    minutes: float,
    evaluations: int = 0,
    seed: int = 0,
) -> tuple[tuple[int, ...], dict]:
    """The set of ``len(start)`` blocks to remove with the least ``fitness(removed,
    windows)`` (KL on that many calibration windows), and what the search did."""
    rng = random.Random(seed)
    d = len(start)
    deadline = time.monotonic() + 60 * minutes
    spent = 0

    def done() -> bool:
        return time.monotonic() > deadline or (evaluations and spent >= evaluations)

    def score(candidates: list[tuple[int, ...]], windows: int) -> list[tuple[float, tuple]]:
        nonlocal spent
        spent += len(candidates)
        return sorted((fitness(c, windows), c) for c in candidates)

    initial = {tuple(sorted(start))}
    possible = _binomial(blocks, d)
    while len(initial) < min(INITIAL + 1, possible):
        initial.add(tuple(sorted(rng.sample(range(blocks), d))))
    parent = score(sorted(initial), stages[0])[0][1]
    generations = 0
    while d and possible > 1 and not done():
        children: set[tuple[int, ...]] = set()
        while len(children) < min(OFFSPRING, possible - 1):
            child = mutate(parent, blocks, rng)
            if child != parent:
                children.add(child)
        kept = [c for _, c in score(sorted(children), stages[0])[: SURVIVORS[0]]]
        parent = score([parent, *kept], stages[1])[0][1]
        generations += 1
    final = fitness(parent, stages[1])
    return parent, {"generations": generations, "evaluations": spent, "kl": final,
                    "started_from": list(start)}  # fmt: skip


def _binomial(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)
