"""Writing results: a Hugging Face checkpoint plus the report, the allocation picture and
the resolved recipe, into an output folder that appears only when complete.

``save`` writes a model the caller holds (``prunella.save``); ``save_store`` writes
what a pipeline run pruned, from its :mod:`store <prunella.engine.store>`, dense or packed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..report.build import render
from ..report.plots import allocation_figure
from .folders import atomic_folder, check_disk_space, check_out_dir, scratch_folder
from .gguf_file import GGUF_FILE, write_gguf
from .pack import pack
from .quantized import write_compressed_tensors
from .safetensors_io import model_nbytes

REPORT = "prune_report.json"
RECIPE = "recipe.yaml"
ALLOCATION_FIGURE = "allocation.png"
REPORT_HTML = "report.html"


def write_extras(folder: Path, report: dict | None, recipe=None) -> None:
    """The report (JSON and HTML), the allocation pictures (``allocation.png`` for the
    first axis of the plan, ``allocation-AXIS.png`` for any other) and the resolved recipe."""
    recipe_yaml = recipe.to_yaml() if recipe is not None else None
    if recipe_yaml is not None:
        (folder / RECIPE).write_text(recipe_yaml, encoding="utf-8")
    if report is not None:
        (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        axes = (report.get("plan") or {}).get("axes") or {}
        sizes = {layer["name"]: layer["shape"][0] * layer["shape"][1] for layer in report["layers"]}
        for i, (name, axis) in enumerate(axes.items()):
            figure = ALLOCATION_FIGURE if i == 0 else f"allocation-{name}.png"
            allocation_figure(name, axis, sizes, folder / figure)
        (folder / REPORT_HTML).write_text(render(report, recipe_yaml), encoding="utf-8")


def save(
    model,
    out_dir: str | Path,
    report: dict | None = None,
    *,
    tokenizer=None,
    overwrite: bool = False,
    model_dir: str | Path | None = None,
    recipe=None,
) -> Path:
    """Save ``model`` (safetensors), its tokenizer and ``report`` atomically to ``out_dir``.

    Without ``tokenizer``, the tokenizer files are copied from the source
    checkpoint named in ``report["model"]`` when that is a folder.
    """
    if model_dir is None and report is not None and Path(str(report.get("model"))).is_dir():
        model_dir = report["model"]
    out = check_out_dir(out_dir, model_dir, overwrite)
    if tokenizer is None and model_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return _fill(out, model_nbytes(model), model.save_pretrained, tokenizer, report, recipe)


def save_store(
    store,
    work,
    out: Path,
    report: dict,
    recipe,
    tokenizer,
    overwrite: bool = False,
    grids: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the pruned model held by ``store`` (:mod:`prunella.engine.store`; ``work``
    its resume folder, or ``None``) to ``out``: dense, or as the recipe's ``format``
    says, packed (sparse-bitmask), compressed-tensors or GGUF (``grids``: each quantized
    layer's grid, ``extra``: their scales), from a dense copy written first."""
    if recipe.format in ("sparse-bitmask", "compressed-tensors", "gguf"):
        with scratch_folder(out) as tmp:
            dense = tmp / out.name
            as_dense = recipe.model_copy(update={"format": "hf"})
            save_store(store, work, dense, report, as_dense, tokenizer)
            check_out_dir(out, store.path, overwrite)
            if recipe.format == "sparse-bitmask":
                pack(dense, out, overwrite=overwrite, progress=False)
                (out / RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")
            elif recipe.format == "gguf":
                with atomic_folder(out) as folder:
                    _write_gguf(dense, folder, recipe, grids or {}, extra or {})
            else:
                with atomic_folder(out) as folder:
                    write_compressed_tensors(dense, folder, grids or {}, extra or {})
                    for file in dense.iterdir():  # tokenizer, report, recipe
                        if not (folder / file.name).exists() and "safetensors" not in file.name:
                            (folder / file.name).write_bytes(file.read_bytes())
                    (folder / RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")
        return out
    return _fill(
        out, store.output_bytes(), lambda tmp: store.write(tmp, work), tokenizer, report, recipe
    )


def _write_gguf(dense: Path, folder: Path, recipe, grids: dict, scales: dict) -> None:
    """``folder``: the one GGUF file (weights, hyper-parameters, tokenizer) and the
    report, which gains what was written (``gguf``: each tensor's type)."""
    written = write_gguf(dense, folder / GGUF_FILE, recipe.gguf_type, grids, scales)
    report = json.loads((dense / REPORT).read_text(encoding="utf-8"))
    report["gguf"] = written
    write_extras(folder, report, recipe)


def _fill(out: Path, nbytes: int, write_weights, tokenizer, report, recipe) -> Path:
    """Check for ``nbytes`` of room, then fill ``out`` atomically: the weights (by
    ``write_weights(folder)``), the tokenizer, the report and the recipe."""
    check_disk_space(out.resolve().parent, nbytes)
    with atomic_folder(out) as tmp:
        write_weights(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_extras(tmp, report, recipe)
    return out
