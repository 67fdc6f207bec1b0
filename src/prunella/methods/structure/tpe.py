"""TPE's search over structures: which blocks go and how many KV groups, by a
tree-structured Parzen estimator on the KL fitness.

Bergstra et al., "Algorithms for Hyper-Parameter Optimization", NeurIPS 2011 (TPE), as
optuna's :class:`~optuna.samplers.TPESampler` (multivariate, Falkner et al. 2018), the
sampler the sparsity axis's TPE search uses too. The space is EvoPress's joint genome
(:mod:`.evopress`), the one Minitron searches: the set of removed blocks and the
number of KV groups, the MLP width then the widest the budget leaves (the caller's
fitness sees only genomes that meet the budget).

TPE samples numbers, not sets, so a trial draws

* the depth ``d``, an integer in ``depths`` (from no block removed to the depth that
  alone meets the budget; ``(d, d)`` for the paper-style search of which ``d`` blocks
  go),
* the number of KV groups, an integer in ``kv_range``,
* a priority ``p_i`` in [0, 1] for every block,

and the ``d`` blocks of least priority go (random keys: Bean, "Genetic Algorithms and
Random Keys for Sequencing and Optimization", ORSA J. Computing 1994). The first trial
is the start (the winning candidate: its removed blocks at priority 0, the others at 1),
so the search never returns anything worse than it; ``startup`` random trials follow
(optuna's default, 10) before the estimator. Every genome is scored once, on all the
fitness tokens (TPE has no selection stages); trials that draw a genome already scored
take its score without an evaluation.

Where we differ: TPE was not published for this space; we apply the estimator the
sparsity search uses to the genome EvoPress's joint search evolves, so that the two
searches compare on the same fitness, budget and candidates.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

from .evopress import DRAWS, Genome

PAPER = (
    "Bergstra et al., Algorithms for Hyper-Parameter Optimization, NeurIPS 2011 (TPE), "
    "over EvoPress's joint genome of removed blocks and KV groups"
)
STARTUP = 10  # random trials before the estimator (optuna's default)


def genome_of(params: dict, blocks: int) -> Genome:
    """The removed blocks (the ``depth`` of least priority; ties to the lower index) and
    the KV groups of one trial's parameters."""
    order = sorted(range(blocks), key=lambda i: (params[f"p{i:03d}"], i))
    return tuple(sorted(order[: params["depth"]])), params["kv"]


def start_params(start: Genome, blocks: int) -> dict:
    """The parameters whose genome is ``start``."""
    removed = set(start[0])
    priorities = {f"p{i:03d}": 0.0 if i in removed else 1.0 for i in range(blocks)}
    return {"depth": len(removed), "kv": start[1], **priorities}


def search(
    fitness: Callable[[Genome, int], float],
    start: Genome,
    blocks: int,
    kv_range: tuple[int, int],
    depths: tuple[int, int],
    windows: int,
    minutes: float,
    evaluations: int = 0,
    seed: int = 0,
    startup: int = STARTUP,
) -> tuple[Genome, dict]:
    """The ``(removed blocks, KV groups)`` of least ``fitness(genome, windows)`` that TPE
    finds from ``start`` (always scored) in ``minutes`` (or ``evaluations`` distinct
    genomes scored; one out of the budget, of infinite fitness, is not), and what the
    search did."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
    with warnings.catch_warnings():  # multivariate TPE is "experimental" in optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(sampler=sampler)
    start = (tuple(sorted(start[0])), start[1])
    study.enqueue_trial(start_params(start, blocks))
    scores: dict[Genome, float] = {}
    deadline = time.monotonic() + 60 * minutes
    trials = repeats = scored = 0
    while trials == 0 or (  # the start always, then until the budget is spent
        time.monotonic() < deadline and not (evaluations and scored >= evaluations)
    ):
        trial = study.ask()
        params = {
            "depth": trial.suggest_int("depth", *depths),
            "kv": trial.suggest_int("kv", *kv_range),
            **{f"p{i:03d}": trial.suggest_float(f"p{i:03d}", 0.0, 1.0) for i in range(blocks)},
        }
        genome = genome_of(params, blocks)
        repeats = repeats + 1 if genome in scores else 0
        if genome not in scores:
            scores[genome] = fitness(genome, windows)
            scored += math.isfinite(scores[genome])  # (out of the budget: no forward)
        value = scores[genome]
        study.tell(trial, value if math.isfinite(value) else 1e30)
        trials += 1
        if repeats >= DRAWS:  # the sampler keeps drawing genomes already scored
            break
    best = min(scores, key=lambda g: (scores[g], g != start))
    return best, {
        "method": "tpe",
        "trials": trials,
        "evaluations": scored,
        "kl": scores[best],
        "started_from": {"removed_blocks": list(start[0]), "kv_groups": start[1]},
    }
