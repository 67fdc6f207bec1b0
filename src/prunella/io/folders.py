"""Output folders: checked before any work, filled in a temporary sibling, renamed into place.

``OUT`` never holds a half-written result: it is written as a hidden sibling
folder ``.OUT.tmp-*``, its files and the folder are flushed to the disk (fsync), and
it is renamed into place. An existing ``OUT`` is replaced only with ``overwrite``,
and never if it overlaps the input; the replacement is one atomic exchange of the two
folders (``renameat2(RENAME_EXCHANGE)``), so a crash at any moment leaves the
previous ``OUT`` or the new one, whole, never none. Temporary folders that a killed
run left behind are removed by the next run that writes beside them (a live run
holds a lock on its own). Missing parent folders are created when writing starts
(not while checking), and everything written gets the permissions the user's umask
gives (as ``save_pretrained`` does), not the private modes of temporary files.

A full disk, a read-only file system or a refused permission while writing becomes
one line that says what to free or fix (:func:`disk_error`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import PrunellaError
from .faults import fault_point


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


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (names created, renamed or removed in it) to the disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush the file ``path``'s contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then every folder, to the disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(os.path.join(root, name))
    for root, _dirs, _files in os.walk(folder, topdown=False):
        fsync_dir(Path(root))


def publish_file(tmp: Path, path: Path) -> None:
    """Rename the written file ``tmp`` to ``path``, both flushed to the disk first and the
    rename after: a crash leaves the previous ``path`` or the new one, never a torn one."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); ``False`` where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _is_abandoned(folder: Path) -> bool:
    """A temporary folder whose run is gone: its lock file ``FOLDER.lock`` is free (a live
    run holds it), or there is none and the folder is over a minute old (a run killed
    between making the folder and its lock)."""
    try:
        fd = os.open(_lock_path(folder), os.O_RDWR)
    except FileNotFoundError:
        return time.time() - folder.stat().st_mtime > 60
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases the lock if this call took it
    return True


def _lock_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".lock")


def clean_leftovers(out: Path) -> list[Path]:
    """Remove the temporary folders beside ``out`` that killed runs left behind, first
    putting back a previous ``out`` that a crash left moved aside with none in its place.
    Returns what was removed."""
    parent = out.resolve().parent
    if not parent.is_dir():
        return []
    removed = []
    for old in sorted(parent.glob(f".{out.name}.old-*")):  # only where exchange is missing
        if (old / out.name).is_dir() and not out.exists():
            os.rename(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    for folder in sorted(parent.glob(f".{out.name}.tmp-*")):
        if folder.is_dir() and _is_abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            _lock_path(folder).unlink(missing_ok=True)
            removed.append(folder)
        elif folder.suffix == ".lock" and not folder.with_suffix("").exists():
            folder.unlink(missing_ok=True)  # the lock of a folder already gone
    return removed


@contextlib.contextmanager
def scratch_folder(out: Path, kind: str = "tmp") -> Iterator[Path]:
    """A temporary folder ``.OUT.<kind>-*`` beside ``out``, locked (``FOLDER.lock``) while
    this run uses it and removed afterwards, or by the next run if this one is killed.
    Leftovers of killed runs are cleaned first."""
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-", dir=parent))
    lock = _lock_path(folder)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out``.

    On any failure the temporary folder is removed and ``out`` is left as it was, so
    ``out`` never holds a half-written checkpoint; the files and folders are on the disk
    before the rename that publishes them, and an existing ``out`` is exchanged with the
    new one in one step.
    """
    with scratch_folder(out) as tmp:
        yield tmp
        apply_umask(tmp)  # mkdtemp makes 0700 and safetensors writes 0600
        fsync_tree(tmp)
        parent = tmp.parent
        fault_point("publish")
        if not out.exists():
            os.rename(tmp, out)
        elif not _exchange(tmp, out):  # two renames; clean_leftovers undoes a crash between
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(parent)
        fault_point("published")  # the previous out, if any, is now in tmp: removed below


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON atomically (temporary name, flushed, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    publish_file(tmp, path)


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def disk_error(exc: OSError, kept: Path | None = None) -> PrunellaError:
    """A full disk, read-only file system or refused permission met while writing, as one
    line saying what to free or fix (``kept``: the work folder whose finished blocks stay)."""
    where = Path(exc.filename) if exc.filename else None
    folder = existing_ancestor(where) if where is not None else None
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        room = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free" if folder else ""
        what = "no space left on the disk" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        message = f"{what} writing {where} ({room}): free space in {folder} or choose another --out"
    elif exc.errno == errno.EROFS:
        message = f"{folder} is on a read-only file system: choose another --out or remount it"
    else:
        message = f"permission denied writing {where}: fix the permissions of {folder}"
    if kept is not None and (kept / "state.json").is_file():
        message += f"; the finished blocks are kept in {kept}: re-run the same command to finish"
    return PrunellaError(message)


def content_sha256(path: Path) -> str:
    """The SHA-256 of a file, or of a folder's files and their names (a ``datasets``
    folder), read in 1 MiB blocks: a calibration corpus may be gigabytes."""
    digest = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, what: str):
    """The JSON in file ``path`` (``what`` names it in the one-line errors)."""
    if not path.is_file():
        raise PrunellaError(f"{what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrunellaError(f"{what} is not valid JSON: {exc}") from None
