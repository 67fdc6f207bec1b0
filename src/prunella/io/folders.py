"""Output folders: checked before any work, filled in a temporary sibling, renamed into place.

``OUT`` never holds a half-written result: it is written as a hidden sibling
folder and renamed when complete. An existing ``OUT`` is replaced only with
``overwrite``, and never if it overlaps the input. Missing parent folders are
created when writing starts (not while checking), and everything written gets
the permissions the user's umask gives (as ``save_pretrained`` does), not the
private modes of temporary files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import PrunellaError


def existing_ancestor(path: Path) -> Path:
    """The nearest folder above ``path`` that exists."""
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    return parent


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
    parent = existing_ancestor(out)
    if not parent.is_dir():
        raise PrunellaError(f"cannot create {out}: {parent} is not a folder")
    try:  # really try: permissions, read-only mounts and quotas all show here
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
        probe.rmdir()
    except OSError as exc:
        raise PrunellaError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    return out


def check_disk_space(folder: Path, needed: int) -> None:
    """Refuse to start writing ``needed`` bytes into ``folder`` without room for them."""
    free = shutil.disk_usage(existing_ancestor(folder / "x")).free
    if free < needed * 1.05 + 2**20:
        raise PrunellaError(
            f"not enough disk space in {folder}: the checkpoint needs {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free"
        )


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the user's umask gives new files."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out``.

    On any failure the temporary folder is removed and ``out`` is left as it was,
    so ``out`` never holds a half-written checkpoint.
    """
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp makes 0700 and safetensors writes 0600
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


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, what: str):
    """The JSON in file ``path`` (``what`` names it in the one-line errors)."""
    if not path.is_file():
        raise PrunellaError(f"{what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrunellaError(f"{what} is not valid JSON: {exc}") from None
