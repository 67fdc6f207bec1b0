"""The report of a prune: ``prune_report.json`` (:func:`build_report`) and ``report.html``,
one self-contained page (figures embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import platform
import tempfile
import time
from pathlib import Path

import torch

from ..engine.device import peak_memory_mb
from ..version import __version__
from .plots import allocation_figure, layer_figure, search_figure

# The columns every layer row has, besides what the axes say of its level (the report's
# "layer_levels"); anything else in a row is the methods' own facts.
LAYER_KEYS = ("name", "shape", "sparsity", "rel_error")


def _calibration_read(calib: dict) -> str:
    """What was read to draw the windows, e.g. 'jsonl, 6.3 MB, 40 documents, 9,120 tokens'."""
    parts = [calib.get("format")]
    if calib.get("bytes") is not None:
        parts.append(f"{calib['bytes'] / 1e6:,.1f} MB")
    if calib.get("documents_read") is not None:
        parts.append(f"{calib['documents_read']:,} documents read")
    if calib.get("tokens_read") is not None:
        parts.append(f"{calib['tokens_read']:,} tokens read")
    if calib.get("chat"):
        parts.append(f"chat rendered with {calib['chat']}")
    return ", ".join(p for p in parts if p) or "-"


def build_report(
    *,
    model,
    source: str,
    recipe,
    axes: dict[str, dict],
    plan,
    calibration: dict,
    windows: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    started: float,
    timings: dict,
    results: list[dict],
    level_keys: list[str],
    extra: dict | None = None,
) -> dict:
    """The JSON report: what was asked (the resolved recipe's methods; ``axes``, each
    axis's own keys, also at the top level: sparsity's solver, rows, pattern and target;
    and its one-line summary), what was done (the
    plan and its cost, every layer's level, achieved sparsity and error), where and how
    long."""
    total = sum(r["shape"][0] * r["shape"][1] for r in results)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in results)
    return {
        "prunella_version": __version__,
        "model": source,
        "architecture": model.config.model_type,
        **{k: v for keys in axes.values() for k, v in keys.items() if k != "summary"},
        "axes": axes,
        "sparsity": zeros / total if total else 0.0,
        "prunable_parameters": total,
        "seed": recipe.seed,
        "calibration": {
            **calibration,
            "nsamples": windows.shape[0],
            "seqlen": windows.shape[1],
            "tokens": windows.numel(),
        },
        "plan": plan.summary(),
        "layer_levels": level_keys,
        "device": str(device),
        "dtype": str(next(p.dtype for p in model.parameters())).removeprefix("torch."),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "passes": recipe.passes,
        "wall_seconds": time.perf_counter() - started,
        "seconds": timings,
        **peak_memory_mb(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **(extra or {}),
        # what a method asks to be said about a layer (e.g. ALPS: no convergence, fallback)
        "notes": [f"{r['name']}: {r['note']}" for r in results if r.get("note")],
        "layers": results,
    }


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:72em;
color:#222;padding:0 1em}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;
border-bottom:1px solid #ddd}table{border-collapse:collapse;font-size:.9em}
td,th{padding:.25em .7em;border-bottom:1px solid #eee;text-align:left}
th{background:#f5f5f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:1em;overflow:auto}
.kv td:first-child{color:#666}
"""


def _png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _rows(pairs) -> str:
    return "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in pairs
    )


def _facts(row: dict, levels: list[str]) -> str:
    """The methods' own facts about a layer (whatever they reported), as ``key=value``."""
    facts = {k: v for k, v in row.items() if k not in LAYER_KEYS and k not in levels}
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items()
    )


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render(report: dict, recipe_yaml: str | None = None) -> str:
    """The HTML page for a prune report."""
    e = html.escape
    plan = report.get("plan") or {"axes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {layer["name"]: layer["shape"][0] * layer["shape"][1] for layer in report["layers"]}
        figures = [
            _png(allocation_figure(name, axis, sizes, Path(tmp) / f"allocation-{name}.png"))
            for name, axis in plan["axes"].items()
        ]
        figures.append(_png(layer_figure(report, Path(tmp) / "layers.png")))
        search = next(
            (a["params"]["search"] for a in plan["axes"].values() if "search" in a["params"]), None
        )
        search_html = ""
        if search and search.get("curve"):
            facts = [
                ("evaluations", search.get("evaluations")),
                ("seconds", search.get("seconds")),
                ("best KL on calibration tokens", f"{search.get('best_kl') or 0:.4f}"),
                ("study / storage", f"{search.get('study')} / {search.get('storage')}"),
            ]
            if "held_out_kl" in search:
                facts.append(
                    ("held-out KL: found / uniform",
                     f"{search['held_out_kl']:.4f} / {search['held_out_kl_uniform']:.4f}")
                )  # fmt: skip
            curve = _png(search_figure(search, Path(tmp) / "search.png"))
            search_html = f"<h2>Search</h2><table class=kv>{_rows(facts)}</table><p>{curve}</p>"
    calib = report.get("calibration", {})
    cost = plan.get("cost") or {}
    summary = [
        ("model", report.get("model")),
        ("architecture", report.get("architecture")),
        *((name, keys.get("summary", "")) for name, keys in (report.get("axes") or {}).items()),
        *(
            (
                f"{name}: target, allocation",
                f"{axis['target']:.4g}, {axis['method']} ({axis['granularity']} granularity)",
            )
            for name, axis in plan["axes"].items()
        ),
        ("achieved sparsity", f"{report.get('sparsity', 0):.4%}"),
        ("prunable weights", f"{report.get('prunable_parameters', 0):,}"),
        *(
            [
                (
                    "checkpoint bytes (plan)",
                    f"{cost['bytes']:,} of {cost['dense_bytes']:,} dense ({cost['format']})",
                )
            ]
            if cost
            else []
        ),
        (
            "calibration",
            f"{calib.get('source')}: {calib.get('nsamples')} x "
            f"{calib.get('seqlen')} tokens, seed {report.get('seed')}",
        ),
        ("calibration data read", _calibration_read(calib)),
        ("passes per block", report.get("passes", "")),
        (
            "device / dtype",
            f"{report.get('device')} / {report.get('dtype')} "
            f"(compute {report.get('compute_dtype')})",
        ),
        ("wall time", f"{report.get('wall_seconds', 0):.1f} s"),
        (
            "peak memory",
            f"{report.get('peak_rss_mb', 0):.0f} MiB RSS"
            + (f", {report['peak_cuda_mb']:.0f} MiB CUDA" if "peak_cuda_mb" in report else ""),
        ),
        ("Prunella / torch", f"{report.get('prunella_version')} / {report.get('torch')}"),
    ]
    phases = _rows((k, f"{v:.2f} s") for k, v in (report.get("seconds") or {}).items())
    evaluation = ""
    if report.get("evaluation"):
        ev = report["evaluation"]
        rows = [
            ("data", ev.get("data")),
            ("dense perplexity", f"{ev['dense_perplexity']:.3f}"),
            ("pruned perplexity", f"{ev['perplexity']:.3f}"),
        ]
        if "kl_to_reference" in ev:
            rows.append(("KL to dense (nats/token)", f"{ev['kl_to_reference']:.4f}"))
        rows.append(("tokens", ev.get("tokens")))
        evaluation = f"<h2>Evaluation</h2><table class=kv>{_rows(rows)}</table>"
    levels = report.get("layer_levels") or []
    layer_rows = "".join(
        f"<tr><td>{e(r['name'])}</td><td>{r['shape'][0]}x{r['shape'][1]}</td>"
        + "".join(f"<td class=n>{e(_cell(r.get(k)))}</td>" for k in levels)
        + f"<td class=n>{r['sparsity']:.4f}</td><td class=n>{r['rel_error']:.4f}</td>"
        f"<td>{e(_facts(r, levels))}</td></tr>"
        for r in report["layers"]
    )
    level_heads = "".join(f"<th>{e(k.replace('_', ' '))}</th>" for k in levels)
    recipe = f"<h2>Recipe</h2><pre>{e(recipe_yaml)}</pre>" if recipe_yaml else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Prunella report</title>
<style>{CSS}</style></head><body>
<h1>Prunella report</h1>
<table class=kv>{_rows(summary)}</table>
{evaluation}
<h2>Where the compression went</h2>
{"".join(f"<p>{f}</p>" for f in figures)}
{search_html}
<h2>Time per phase</h2><table class=kv>{phases}</table>
<h2>Layers</h2>
<table><tr><th>layer</th><th>shape</th>{level_heads}<th>sparsity</th>
<th>rel. error</th><th>facts</th></tr>{layer_rows}</table>
{recipe}
</body></html>
"""
