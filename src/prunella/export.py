"""Writing results: a plain Hugging Face checkpoint plus ``prune_report.json``.

The checkpoint is written to a temporary sibling folder and renamed into place
only when complete, so ``OUT_DIR`` never holds a half-written model. An existing
``OUT_DIR`` is replaced only with ``overwrite``, and never if it is the input.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open

from .errors import PrunellaError
from .plots import allocation_figure

REPORT = "prune_report.json"
ALLOCATION_FIGURE = "allocation.png"
REPORT_HTML = "report.html"


def check_out_dir(out_dir: str | Path, model_dir: str | Path | None, overwrite: bool) -> Path:
    """Refuse an output folder that is the input, a file, or non-empty without ``overwrite``."""
    out = Path(out_dir)
    if model_dir is not None:
        src = Path(model_dir).resolve()
        dst = out.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise PrunellaError(f"output folder {out} overlaps the input model folder {model_dir}")
    if out.exists() and not out.is_dir():
        raise PrunellaError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrunellaError(f"output folder {out} exists and is not empty (use --overwrite)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise PrunellaError(f"the parent folder of {out} does not exist")
    try:  # really try: permissions, read-only mounts and quotas all show here
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
        probe.rmdir()
    except OSError as exc:
        raise PrunellaError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    return out


def model_nbytes(model) -> int:
    """Bytes of the model's tensors as saved (tied tensors once)."""
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        if id(tensor) not in seen and not tensor.is_meta:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def check_disk_space(folder: Path, needed: int) -> None:
    """Refuse to start writing ``needed`` bytes into ``folder`` without room for them."""
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05 + 2**20:
        raise PrunellaError(
            f"not enough disk space in {folder}: the checkpoint needs {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free"
        )


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out``.

    On any failure the temporary folder is removed and ``out`` is left as it was,
    so ``out`` never holds a half-written checkpoint.
    """
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result is a normal folder
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, old / out.name)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old / out.name, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_extras(folder: Path, report: dict | None, recipe=None) -> None:
    """The report (JSON and HTML), the allocation picture and the resolved recipe."""
    from .recipe import RECIPE
    from .report import render

    recipe_yaml = recipe.to_yaml() if recipe is not None else None
    if recipe_yaml is not None:
        (folder / RECIPE).write_text(recipe_yaml, encoding="utf-8")
    if report is not None:
        (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if report.get("allocation"):
            sizes = {
                layer["name"]: layer["shape"][0] * layer["shape"][1] for layer in report["layers"]
            }
            allocation_figure(report["allocation"], sizes, folder / ALLOCATION_FIGURE)
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
    check_disk_space(out.resolve().parent, model_nbytes(model))
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_extras(tmp, report, recipe)
    return out


def save_streamed(
    model,
    work,
    out: Path,
    report: dict,
    recipe,
    key_map: dict,
    adapter,
    tokenizer,
    overwrite: bool = False,
) -> Path:
    """Assemble a streamed run's checkpoint from the work folder's block files.

    Each finished block file becomes one shard (hard-linked, so no copy), the
    tensors outside the blocks the last shard, with the usual
    ``model.safetensors.index.json``.
    """
    from .streaming import INDEX, module_tensors, save_tensors

    count = len(adapter.blocks(model)) + 1
    rest = module_tensors(model, "", key_map)
    check_disk_space(out.resolve().parent, sum(t.numel() * t.element_size() for t in rest.values()))
    with atomic_folder(out) as tmp:
        weight_map = {}
        for i in range(count - 1):
            shard = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.link(work.block_file(i), tmp / shard)
            with safe_open(tmp / shard, framework="pt") as handle:
                weight_map.update(dict.fromkeys(handle.keys(), shard))
        shard = f"model-{count:05d}-of-{count:05d}.safetensors"
        save_tensors(rest, tmp / shard)
        weight_map.update(dict.fromkeys(rest, shard))
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / INDEX).write_text(
            json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_extras(tmp, report, recipe)
    return out
