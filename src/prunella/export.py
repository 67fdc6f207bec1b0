"""Writing results: a plain Hugging Face checkpoint plus ``prune_report.json``.

The checkpoint is written to a temporary sibling folder and renamed into place
only when complete, so ``OUT_DIR`` never holds a half-written model. An existing
``OUT_DIR`` is replaced only with ``overwrite``, and never if it is the input.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import PrunellaError
from .plots import allocation_figure

REPORT = "prune_report.json"
ALLOCATION_FIGURE = "allocation.png"


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
    if not parent.exists():
        raise PrunellaError(f"the parent folder of {out} does not exist")
    if not os.access(parent, os.W_OK):
        raise PrunellaError(f"cannot write to {parent}: permission denied")
    return out


def save(
    model,
    out_dir: str | Path,
    report: dict | None = None,
    *,
    tokenizer=None,
    overwrite: bool = False,
    model_dir: str | Path | None = None,
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
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result is a normal folder
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            if report.get("allocation"):
                sizes = {
                    layer["name"]: layer["shape"][0] * layer["shape"][1]
                    for layer in report["layers"]
                }
                allocation_figure(report["allocation"], sizes, tmp / ALLOCATION_FIGURE)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
