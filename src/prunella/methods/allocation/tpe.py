"""TPE: Bayesian search over per-unit sparsities with a tree-structured Parzen estimator.

The adaptive sparsity search of "Enhancing Large Multimodal Models with Adaptive
Sparsity and KV Cache Compression" (2025): a TPE sampler (Bergstra et al., NeurIPS
2011; optuna's :class:`~optuna.samplers.TPESampler`) proposes one sparsity per unit
(a block, or a layer with ``--granularity layer``) within ``target +- spread``; the
candidate is made exact to the budget (one common shift, then whole ladder steps,
:func:`prunella.methods.search.levels_for_ratios`) and scored by its KL divergence to the
dense model on ``tokens`` calibration tokens (the same windows for every candidate,
so scores compare). The first candidate is the uniform allocation, so the search
never returns anything worse than uniform on those tokens.

Every worker asks the shared sampler for its next candidate (optuna's storage holds
the trials), so TPE runs in parallel without a coordinator's queue. Where we
differ: the paper scores candidates with the task loss; we use the KL fitness of
every search here. ``startup`` random candidates come before the estimator
(optuna's default is 10).
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ...engine.stats import FITNESS
from ...registry import Option
from ..search import SEARCH_OPTIONS, levels_for_ratios, start
from .run import AllocationRun, Assignment

PAPER = (
    "Zhang et al., Enhancing Large Multimodal Models with Adaptive Sparsity and KV Cache "
    "Compression (TPE search of per-layer sparsities), 2025"
)
NEEDS = frozenset({FITNESS})
OPTIONS = (
    *SEARCH_OPTIONS,
    Option(
        "spread",
        float,
        0.15,
        "unit sparsities within target +- spread",
        low=0.0,
        low_open=True,
        high=1.0,
    ),
    Option("tokens", int, 16384, "calibration tokens each candidate is scored on", low=1),
    Option("startup", int, 10, "random candidates before the estimator", low=0),
)
METRIC = None


def sampler(setup: dict, offset: int = 0):
    """The TPE sampler of a process joined to the study, seeded ``seed + offset``."""
    import optuna

    options = setup["options"]
    return optuna.samplers.TPESampler(
        seed=options["seed"] + offset, n_startup_trials=options["startup"], multivariate=True
    )


def propose(trial, ladder, units: dict, setup: dict) -> tuple[list[int], list]:
    """One candidate: a sparsity per unit from the sampler, made exact to the budget."""
    spread, target = setup["options"]["spread"], ladder.target
    sparsity = {
        unit: trial.suggest_float(unit, max(0.0, target - spread), min(0.99, target + spread))
        for unit in units
    }
    levels = levels_for_ratios(ladder, units, sparsity)
    return [levels[n] for n in ladder.names], setup["windows"]


def allocate(run: AllocationRun, **options) -> Assignment:
    """The allocation TPE finds within the budget."""
    from optuna.trial import TrialState

    from ..search.study import run_one

    count = run.windows_for(options["tokens"])
    setup = {"windows": list(range(count))}
    session = start(run, options, setup, sampler(setup | {"options": options}), propose)
    study = session.study
    if not study.trials:  # the uniform allocation first
        study.enqueue_trial(dict.fromkeys(run.units, session.ladder.target))
    bar = tqdm(desc="tpe", unit="candidate", disable=not run.progress)
    complete = (TrialState.COMPLETE,)
    try:
        # the budget counts the candidates the storage holds (a re-run goes on from them)
        session.evaluator.evaluations = len(study.get_trials(deepcopy=False, states=complete))
        while not session.spent():
            run_one(study, session.evaluator.objective)
            done = study.get_trials(deepcopy=False, states=complete)
            session.evaluator.evaluations = len(done)
            best = min(t.value for t in done)
            session.record(best)
            bar.update()
            bar.set_postfix(kl=f"{best:.4f}")
    finally:
        bar.close()
        session.close()
    best_trial = study.best_trial
    levels = dict(zip(session.ladder.names, best_trial.user_attrs["levels"], strict=True))
    return Assignment(run.budget().axis, **session.finish(levels, best_trial.value))
