"""Figures for reports: the per-block allocation picture (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from ..engine.adapters import block_index


def allocation_figure(axis: str, plan: dict, layer_sizes: dict[str, int], path: str | Path) -> Path:
    """Bars: the parameter-weighted value per block on ``axis`` (``plan``: that axis's
    plan). Line: the method's metric per block."""
    import matplotlib.ticker

    plt = _pyplot()

    pruned: dict[int, float] = {}
    total: dict[int, int] = {}
    for name, value in plan[axis].items():
        b = block_index(name)
        pruned[b] = pruned.get(b, 0.0) + value * layer_sizes[name]
        total[b] = total.get(b, 0) + layer_sizes[name]
    blocks = sorted(total)
    per_block = [pruned[b] / total[b] for b in blocks]

    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(blocks) + 2), 3.6), dpi=120)
    ax.bar(blocks, per_block, color="#7a9cc6", label=axis)
    ax.axhline(plan["target"], color="#444", lw=1, ls="--", label=f"target {plan['target']:.4g}")
    low, high = min(per_block), max(per_block)
    margin = 0.1 * max(abs(high), abs(low), 1e-9) if high > 1 else 0.1
    ax.set_ylim(max(0.0, low - margin), high + margin if high > 1 else min(1.0, high + 0.1))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel(axis)
    title = f"allocation: {plan['method']}"
    if plan.get("metric") and plan.get("metric_name"):
        values: dict[int, list[float]] = {}
        for unit, value in plan["metric"].items():
            values.setdefault(block_index(unit + "."), []).append(value)
        twin = ax.twinx()
        twin.plot(
            blocks,
            [sum(values[b]) / len(values[b]) if b in values else math.nan for b in blocks],
            color="#c0504d",
            marker="o",
            ms=3,
            lw=1.5,
            label=plan["metric_name"],
        )
        twin.set_ylabel(plan["metric_name"], color="#c0504d")
        title += f" ({plan['metric_name']}, {plan['granularity']} granularity)"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return _save(plt, fig, path)


def layer_figure(report: dict, path: str | Path) -> Path:
    """Per layer: achieved sparsity (bars) and relative reconstruction error (line)."""
    plt = _pyplot()

    layers = report["layers"]
    x = list(range(len(layers)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.05 * len(layers) + 4), 3.6), dpi=120)
    ax.bar(x, [layer["sparsity"] for layer in layers], color="#9bbb59", width=1.0, label="sparsity")
    ax.set_ylim(0, 1)
    ax.set_xlabel("linear layer (in model order)")
    ax.set_ylabel("sparsity")
    twin = ax.twinx()
    twin.plot(
        x, [layer["rel_error"] for layer in layers], color="#4f81bd", lw=1, label="relative error"
    )
    twin.set_ylabel("||(W - W_hat) X|| / ||W X||", color="#4f81bd")
    axes = ", ".join(report.get("axes") or {})
    ax.set_title(f"per-layer sparsity and reconstruction error ({axes})", fontsize=10)
    return _save(plt, fig, path)


def search_figure(search: dict, path: str | Path) -> Path:
    """The search curve: the best KL to the dense model against evaluations."""
    plt = _pyplot()

    evaluations, best = zip(*search["curve"], strict=True)
    fig, ax = plt.subplots(figsize=(6.0, 3.0), dpi=120)
    ax.plot(evaluations, best, color="#7a9cc6", marker="o", ms=2, lw=1.5, drawstyle="steps-post")
    ax.set_xlabel("candidate evaluations")
    ax.set_ylabel("KL to dense (nats/token)")
    ax.set_title("search: best candidate so far", fontsize=10)
    return _save(plt, fig, path)


def _pyplot():
    """matplotlib's pyplot, drawing without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
