"""EvoPress's search over structures: which blocks go, and with them the width, by
evolution on the KL fitness.

Sieberling et al., "EvoPress: Accurate Dynamic Model Compression via Evolutionary
Search", ICML 2025 (IST-DASLab/EvoPress, ``evo_drop_search.py`` with
``--drop_entire_block``, the defaults of ``scripts/run_drop_search.sh``):

1. the initial population: ``initially_generated`` (64) random genomes and the start,
   scored on the first stage's tokens; the best is the parent;
2. each generation, ``offspring`` (32) distinct children of the parent, each with
   ``min(U{1,3}, U{1,3})`` mutations;
3. selection in stages: the children scored on ``tokens[0]`` calibration tokens, the best
   ``survivors[0]`` (2) kept; then, with the parent (elitism), on ``tokens[1]`` tokens,
   the best one is the next parent.

Two genomes, the same loop (:func:`search`):

* :func:`depth_search`, the paper's: a set of ``d`` removed blocks, ``d`` fixed; a
  mutation swaps a removed block for a kept one;
* :func:`joint_search`, depth and width together, the space Minitron searches: a set of
  removed blocks of any size and a number of KV groups; the MLP width is then the widest
  that the budget leaves (the caller's ``width_of``), so every genome meets the budget.
  A mutation is, with equal chance among those possible, the paper's swap, one more
  block removed, one block restored, or one KV group more or fewer. This is where we
  differ from the paper, whose depth search cannot trade depth for width.

The paper runs ``d (n - d) / 1.5`` generations on 2048 and 32768 tokens; we run as many
generations as ``minutes`` (or ``evaluations``) allow, and the stages' tokens are whole
calibration windows, at most the ``--fitness-tokens`` the candidates were compared on.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

PAPER = (
    "Sieberling et al., EvoPress: Accurate Dynamic Model Compression via Evolutionary "
    "Search, ICML 2025 (depth pruning, evo_drop_search.py)"
)
OFFSPRING, INITIAL, SURVIVORS, MAX_MUTATIONS = 32, 64, (2, 1), 3
DRAWS = 50  # mutations drawn per child wanted before a generation goes on with fewer

G = TypeVar("G", bound=Hashable)
Genome = tuple[tuple[int, ...], int]  # the joint search's: (removed blocks, KV groups)


def mutations(rng: random.Random) -> int:
    """``min(U{1,3}, U{1,3})``: EvoPress's number of mutations of one child."""
    return min(rng.randint(1, MAX_MUTATIONS), rng.randint(1, MAX_MUTATIONS))


def mutate(removed: tuple[int, ...], blocks: int, rng: random.Random) -> tuple[int, ...]:
    """``min(U{1,3}, U{1,3})`` swaps of a removed block for a kept one."""
    gone = set(removed)
    for _ in range(mutations(rng)):
        gone = _swap(gone, blocks, rng)
    return tuple(sorted(gone))


def _swap(gone: set[int], blocks: int, rng: random.Random) -> set[int]:
    back = rng.choice(sorted(gone))
    out = rng.choice([i for i in range(blocks) if i not in gone])
    return (gone - {back}) | {out}


def mutate_joint(
    genome: Genome, blocks: int, kv_range: tuple[int, int], rng: random.Random
) -> Genome:
    """``min(U{1,3}, U{1,3})`` mutations of ``(removed, kv)``, each one of: a swap, one
    more block removed (never the last one), one block restored, one KV group more or
    fewer (within ``kv_range``)."""
    gone, kv = set(genome[0]), genome[1]
    for _ in range(mutations(rng)):
        moves = []
        if gone and len(gone) < blocks:
            moves.append("swap")
        if len(gone) < blocks - 1:
            moves.append("remove")
        if gone:
            moves.append("restore")
        if kv_range[0] < kv_range[1]:
            moves.append("kv")
        move = rng.choice(moves)
        if move == "swap":
            gone = _swap(gone, blocks, rng)
        elif move == "remove":
            gone.add(rng.choice([i for i in range(blocks) if i not in gone]))
        elif move == "restore":
            gone.remove(rng.choice(sorted(gone)))
        else:
            steps = [s for s in (-1, 1) if kv_range[0] <= kv + s <= kv_range[1]]
            kv += rng.choice(steps)
    return tuple(sorted(gone)), kv


def search(
    fitness: Callable[[G, int], float],
    initial: list[G],
    mutate_one: Callable[[G, random.Random], G],
    stages: tuple[int, int],
    minutes: float,
    evaluations: int = 0,
    rng: random.Random | None = None,
    space: float = math.inf,
) -> tuple[G, dict]:
    """EvoPress's loop: the genome of least ``fitness(genome, windows)`` (KL on that many
    calibration windows) found from ``initial`` (the start first) by ``mutate_one``, and
    what the search did. ``space`` is the number of distinct genomes."""
    rng = rng or random.Random(0)
    deadline = time.monotonic() + 60 * minutes
    spent = 0

    def done() -> bool:
        return time.monotonic() > deadline or bool(evaluations and spent >= evaluations)

    def score(candidates: list[G], windows: int) -> list[tuple[float, G]]:
        nonlocal spent
        spent += len(candidates)
        scored = [(fitness(c, windows), i, c) for i, c in enumerate(candidates)]
        return [(f, c) for f, _, c in sorted(scored, key=lambda s: s[:2])]

    parent = score(initial, stages[0])[0][1]
    generations = 0
    while space > 1 and not done():
        children: list[G] = []
        for _ in range(DRAWS * OFFSPRING):  # near the space's edges fewer may be in reach
            if len(children) == min(OFFSPRING, space - 1):
                break
            child = mutate_one(parent, rng)
            if child != parent and child not in children:
                children.append(child)
        if not children:
            break
        kept = [c for _, c in score(children, stages[0])[: SURVIVORS[0]]]
        parent = score([parent, *kept], stages[1])[0][1]
        generations += 1
    final = fitness(parent, stages[1])
    return parent, {"method": "evopress", "generations": generations, "evaluations": spent,
                    "kl": final}  # fmt: skip


def depth_search(
    fitness: Callable[[tuple[int, ...], int], float],
    start: tuple[int, ...],
    blocks: int,
    stages: tuple[int, int],
    minutes: float,
    evaluations: int = 0,
    seed: int = 0,
) -> tuple[tuple[int, ...], dict]:
    """The set of ``len(start)`` blocks to remove with the least fitness (the paper's
    search)."""
    rng = random.Random(seed)
    d = len(start)
    possible = math.comb(blocks, d)
    initial = [tuple(sorted(start))]
    while len(initial) < min(INITIAL + 1, possible):
        drawn = tuple(sorted(rng.sample(range(blocks), d)))
        if drawn not in initial:
            initial.append(drawn)
    found, facts = search(
        fitness, initial, lambda g, r: mutate(g, blocks, r), stages, minutes, evaluations,
        rng, possible if d else 1,
    )  # fmt: skip
    return found, {**facts, "started_from": list(start)}


def joint_search(
    fitness: Callable[[Genome, int], float],
    start: Genome,
    blocks: int,
    kv_range: tuple[int, int],
    deepest: int,
    stages: tuple[int, int],
    minutes: float,
    evaluations: int = 0,
    seed: int = 0,
) -> tuple[Genome, dict]:
    """The ``(removed blocks, KV groups)`` of least fitness, the depth anywhere from 0 to
    ``blocks - 1``; the initial population draws depths from 0 to ``deepest`` (where
    depth alone meets the budget) and KV groups from ``kv_range``."""
    rng = random.Random(seed)
    start = (tuple(sorted(start[0])), start[1])
    kvs = kv_range[1] - kv_range[0] + 1
    drawable = kvs * sum(math.comb(blocks, d) for d in range(min(deepest, blocks - 1) + 1))
    initial = [start]
    while len(initial) < min(INITIAL + 1, drawable):
        depth = rng.randint(0, min(deepest, blocks - 1))
        drawn = (tuple(sorted(rng.sample(range(blocks), depth))), rng.randint(*kv_range))
        if drawn not in initial:
            initial.append(drawn)
    found, facts = search(
        fitness, initial, lambda g, r: mutate_joint(g, blocks, kv_range, r), stages,
        minutes, evaluations, rng, kvs * (2**blocks - 1),
    )  # fmt: skip
    return found, {**facts, "started_from": {"removed_blocks": list(start[0]),
                                              "kv_groups": start[1]}}  # fmt: skip
