"""DSA: discovered allocation functions.

Li et al., "Discovering Sparsity Allocation for Layer-wise Pruning of Large
Language Models", NeurIPS 2024 (lliai/DSA, ``lib/autolayer.py``).

An allocation function maps a block's pooled Wanda scores ``A = |W| ||X||_2`` (all
its linear layers, flattened) to one number, in three steps written as
``W:(PRE,...)-(REDUCTION)-(POST,...)``:

* 0-2 element-wise ``PRE`` operations: ABS, LOG (``log(x + 1e-6)``, x <= 0 -> 1),
  ABSLOG (``log|x|``, 0 -> 1), POW (x^2), EXP, NORMALIZE (``(x - mean) / std``),
  SIGMOID, TANH, MMS (min-max scaling);
* one ``REDUCTION``: FROBENIUS_NORM, L1_NORM (``sum|x| / n``), GEOMETRIC_MEAN, MEAN,
  VAR, STD, ENTROPY;
* 1-2 scalar ``POST`` transforms: SIN, COS, TAN, ASIN, ACOS, ATAN, EXP, LOG, ABS,
  SIGMOID, TANH, SOFTPLUS (or NO_OP); NaN counts as 0 and Inf as -1.

Mapping (the reference's, a *higher* value prunes *more*): ``a = 1 - minmax(v)``,
rescaled to ``[0, 2 lambda]``, ``s_b = 1 - (a_b - mean(a) + 1 - target)``, so the
ratios span ``2 lambda`` around the target; ``lambda = 0.08`` (option ``spread``). The plan layer
then makes the budget exact.

Search: an evolution over functions (population, tournament selection, crossover of
the three parts, mutation of one part), each function scored by the KL divergence
to the dense model of the allocation it gives (levels of the :mod:`level database
<prunella.methods.search.levels>`), on ``tokens`` calibration tokens. The best function is
then validated on held-out calibration windows (the last fifth), against uniform,
and written as a formula: ``--allocation-opt formula='W:(ABSLOG)-(VAR)-(ATAN,ASIN)'``
applies it to any model or sparsity without searching. The first population holds
the paper's published LLaMA function.

Where we differ: the paper scores functions by perplexity on a held-out part of
the training text; we use the KL fitness of every search here (calibration tokens
only). The paper does not publish its population size, rates or tournament size:
ours are ``population = 20``, crossover and mutation each with probability 0.5,
tournaments of 3. Reductions are estimated on ``draws`` scores drawn per block
(seeded; sums and the entropy are scaled to the block's full count), where the
reference pools every score in memory. The reference's matrix reductions (rank,
determinant, ...) need a matrix and are not applicable to the pooled scores;
they are left out.
"""

from __future__ import annotations

import math
import random

import torch
from tqdm.auto import tqdm

from ...engine.forward import visit_blocks
from ...engine.stats import COL_NORMS, FITNESS, WEIGHTS
from ...errors import PrunellaError
from ...registry import Option
from ..search import SEARCH_OPTIONS, levels_for_ratios, start
from ..sparsity.wanda import wanda_scores
from .run import AllocationRun, Scores

PAPER = (
    "Li et al., Discovering Sparsity Allocation for Layer-wise Pruning of Large Language "
    "Models, NeurIPS 2024"
)
NEEDS = frozenset({WEIGHTS, COL_NORMS, FITNESS})
PUBLISHED = "W:(ABSLOG)-(VAR)-(ATAN,ASIN)"  # the paper's function for LLaMA-1-7B at 70%

PRE = {
    "NO_OP": lambda x: x,
    "ABS": torch.abs,
    "LOG": lambda x: torch.log(torch.where(x <= 0, torch.ones_like(x), x) + 1e-6),
    "ABSLOG": lambda x: torch.log(torch.where(x == 0, torch.ones_like(x), x).abs()),
    "POW": lambda x: x * x,
    "EXP": torch.exp,
    "NORMALIZE": lambda x: (x - x.mean()) / x.std(),
    "SIGMOID": torch.sigmoid,
    "TANH": torch.tanh,
    "MMS": lambda x: (x - x.min()) / (x.max() - x.min()),
}


def _entropy(x: torch.Tensor, full: int) -> torch.Tensor:
    p = x.abs() / x.abs().sum()
    return -(p * torch.log(p + 1e-30)).sum() + math.log(full / x.numel())


REDUCTION = {
    "FROBENIUS_NORM": lambda x, full: (x * x).mean().mul(full).sqrt(),
    "L1_NORM": lambda x, full: x.abs().mean(),
    "GEOMETRIC_MEAN": lambda x, full: torch.exp(torch.log(x.abs() + 1e-30).mean()),
    "MEAN": lambda x, full: x.mean(),
    "VAR": lambda x, full: x.var(),
    "STD": lambda x, full: x.std(),
    "ENTROPY": _entropy,
}
POST = {
    "NO_OP": lambda v: v,
    "SIN": math.sin,
    "COS": math.cos,
    "TAN": math.tan,
    "ASIN": math.asin,
    "ACOS": math.acos,
    "ATAN": math.atan,
    "EXP": math.exp,
    "LOG": math.log,
    "ABS": abs,
    "SIGMOID": lambda v: 1 / (1 + math.exp(-v)),
    "TANH": math.tanh,
    "SOFTPLUS": lambda v: v if v > 30 else math.log1p(math.exp(v)),
}


def parse_formula(text: str) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    """``W:(PRE,...)-(REDUCTION)-(POST,...)`` (a trailing ``-(int)`` is ignored, as in the
    reference) as its three parts."""
    body = str(text).strip()
    if not body.startswith("W:"):
        raise ValueError("a DSA formula reads W:(PRE,...)-(REDUCTION)-(POST,...)")
    parts = [p.strip().strip("()") for p in body[2:].split(")-(")]
    if len(parts) not in (3, 4):
        raise ValueError("a DSA formula reads W:(PRE,...)-(REDUCTION)-(POST,...)")
    pre = tuple(p.strip().upper() for p in parts[0].split(",") if p.strip()) or ("NO_OP",)
    reduction = parts[1].strip().upper()
    post = tuple(p.strip().upper() for p in parts[2].split(",") if p.strip()) or ("NO_OP",)
    for op, table in [*((o, PRE) for o in pre), (reduction, REDUCTION), *((o, POST) for o in post)]:
        if op not in table:
            raise ValueError(f"unknown operation {op!r} (one of {', '.join(table)})")
    return pre, reduction, post


def formula_text(pre: tuple, reduction: str, post: tuple) -> str:
    return f"W:({','.join(pre)})-({reduction})-({','.join(post)})"


OPTIONS = (
    *SEARCH_OPTIONS,
    Option(
        "formula",
        str,
        "",
        "apply this function instead of searching, e.g. " + PUBLISHED,
        parse=lambda t: parse_formula(t) if t else None,
    ),
    Option(
        "spread",
        float,
        0.08,
        "unit ratios span target +- spread (the paper's lambda)",
        low=0.0,
        low_open=True,
        high=1.0,
        high_open=True,
        old=("lam",),
    ),
    Option("population", int, 20, "functions kept each generation", low=2),
    Option("tokens", int, 16384, "calibration tokens each function is scored on", low=1),
    Option(
        "draws",
        int,
        65536,
        "pooled scores drawn per block for the reductions",
        low=16,
        old=("samples",),
    ),
)
METRIC = "dsa_score"


def dsa_value(formula: tuple, scores: torch.Tensor, full: int) -> float:
    """The allocation function on one block's (sampled) pooled scores."""
    pre, reduction, post = formula
    x = scores.double()
    with torch.no_grad():
        for op in pre:
            x = PRE[op](x)
        value = REDUCTION[reduction](x, full).item()
    for op in post:
        try:
            value = POST[op](value)
        except OverflowError:  # exp of a large value: Inf, as torch gives
            value = math.inf
        except (ValueError, ZeroDivisionError):  # outside the domain: NaN, as torch gives
            value = math.nan
    if math.isnan(value):
        return 0.0
    return -1.0 if math.isinf(value) else value


def dsa_ratios(metric: torch.Tensor, target: float, *, spread: float, **_) -> torch.Tensor:
    """Ratio per block, a higher value compressed more: ``1 - (a - mean(a) + 1 - target)``
    with ``a = 2 lambda (1 - minmax(v))`` (min-max again after the flip, as the reference)."""
    span = metric.max() - metric.min()
    if not torch.isfinite(span) or span <= 0:
        return torch.full_like(metric, target)
    a = 1 - (metric - metric.min()) / span
    a = (a - a.min()) * (2 * spread) / (a.max() - a.min())
    return 1 - (a - a.mean() + 1 - target)


ratios = dsa_ratios  # the registry's hook (the plan of a given function)


def block_scores(run: AllocationRun, draws: int, seed: int) -> dict[str, tuple[torch.Tensor, int]]:
    """Per block: ``draws`` pooled Wanda scores drawn (seeded) and the block's count."""
    found: dict[str, tuple[torch.Tensor, int]] = {}
    generator = torch.Generator().manual_seed(seed)

    def visit(prefix: str, block_layers: dict) -> None:
        pooled = torch.cat(
            [wanda_scores(w.float(), s.col_norms).flatten().cpu() for w, s in block_layers.values()]
        )
        pick = torch.randint(len(pooled), (min(draws, len(pooled)),), generator=generator)
        found[prefix.removesuffix(".")] = (pooled[pick], len(pooled))

    visit_blocks(
        run.store, visit, needs=frozenset({COL_NORMS}), windows=run.windows, device=run.device,
        dtype=run.dtype, batch_size=run.batch_size, progress=run.progress,
        desc="allocation (dsa scores)",
    )  # fmt: skip
    return found


def random_formula(rng: random.Random) -> tuple:
    pre = tuple(rng.choice(list(PRE)) for _ in range(rng.randint(0, 2))) or ("NO_OP",)
    post = tuple(rng.choice(list(POST)) for _ in range(rng.randint(1, 2)))
    return pre, rng.choice(list(REDUCTION)), post


def crossover(a: tuple, b: tuple, rng: random.Random) -> tuple:
    return tuple(rng.choice((x, y)) for x, y in zip(a, b, strict=True))


def mutation(f: tuple, rng: random.Random) -> tuple:
    fresh = random_formula(rng)
    part = rng.randrange(3)
    return tuple(fresh[i] if i == part else f[i] for i in range(3))


def tournament(population: list, fitness: dict, rng: random.Random, size: int = 3) -> tuple:
    """The fittest of ``size`` functions drawn from ``population``."""
    drawn = rng.sample(population, min(size, len(population)))
    return min(drawn, key=lambda f: fitness[formula_text(*f)])


def _scores(run: AllocationRun, formula: tuple, scores: dict, options: dict, extra: dict):
    """The function's value per block, for the plan (the blocks are the units)."""
    from ..search.urls import public_url

    metric = {b: dsa_value(formula, s, full) for b, (s, full) in scores.items()}
    blocks = {b: [n for n in run.store.layers() if n.startswith(b + ".")] for b in metric}
    facts = {"storage": public_url(options["storage"]) if options["storage"] else ""}
    if extra:
        facts |= {"formula": formula_text(*formula), "search": extra}
    return Scores(metric, units=blocks, granularity="block", facts=facts)


def allocate(run: AllocationRun, **options) -> Scores:
    """Apply ``formula``, or search for the allocation function within the budget."""
    scores = block_scores(run, options["draws"], options["seed"])
    if options["formula"]:
        return _scores(run, parse_formula(options["formula"]), scores, options, {})
    run.units = {b: [n for n in run.store.layers() if n.startswith(b + ".")] for b in scores}
    held_out = max(1, round(len(run.windows) / 5))
    if len(run.windows) - held_out < 1:
        raise PrunellaError("dsa needs at least 2 calibration windows (one is held out)")
    searched = len(run.windows) - held_out
    count = run.windows_for(options["tokens"], searched)
    ids = list(range(count))
    session = start(run, options, {"windows": ids})
    ladder, names = session.ladder, session.ladder.names
    rng = random.Random(options["seed"])

    def levels_of(formula: tuple) -> dict[str, int]:
        values = [dsa_value(formula, *scores[b]) for b in run.units]
        metric = torch.tensor(values, dtype=torch.float64)
        raw = dsa_ratios(metric, ladder.target, spread=options["spread"])
        return levels_for_ratios(
            ladder, run.units, dict(zip(run.units, raw.tolist(), strict=False))
        )

    fitness: dict[str, float] = {}

    def evaluate(formulas: list[tuple]) -> None:
        new = [f for f in dict.fromkeys(formulas) if formula_text(*f) not in fitness]
        values = session.evaluator.evaluate(
            [(formula_text(*f), [levels_of(f)[n] for n in names], ids) for f in new]
        )
        fitness.update({formula_text(*f): v for f, v in zip(new, values, strict=True)})

    population = [parse_formula(PUBLISHED)]
    while len(population) < options["population"]:
        population.append(random_formula(rng))
    bar = tqdm(desc="dsa", unit="gen", disable=not run.progress)
    try:
        evaluate(population)
        while not session.spent():
            children = []
            for _ in range(options["population"]):
                child = tournament(population, fitness, rng)
                if rng.random() < 0.5:
                    child = crossover(child, tournament(population, fitness, rng), rng)
                if rng.random() < 0.5:
                    child = mutation(child, rng)
                children.append(child)
            evaluate(children)
            pool = list(dict.fromkeys(population + children))
            population = sorted(pool, key=lambda f: fitness[formula_text(*f)])
            population = population[: options["population"]]
            best = fitness[formula_text(*population[0])]
            session.record(best)
            bar.update()
            bar.set_postfix(kl=f"{best:.4f}", formula=formula_text(*population[0]))
    finally:
        bar.close()
        session.close()
    best = population[0]
    held = list(range(searched, len(run.windows)))
    uniform = dict.fromkeys(names, 0)
    extra = session.summary() | {
        "best_kl": fitness[formula_text(*best)],
        "held_out_windows": len(held),
        "held_out_kl": session.fitness(levels_of(best), held),
        "held_out_kl_uniform": session.fitness(uniform, held),
    }
    return _scores(run, best, scores, options, extra)
