"""Test-only fault injection: SIGKILL this process at a named step, or in the middle of a file.

The tests of crash safety kill the real process where it really writes, through one
environment variable (unset, these functions do nothing but read it):

* ``PRUNELLA_FAULT=step:NAME`` -- killed when the code reaches ``fault_point("NAME")``;
  the steps are ``publish`` (the output is whole in its temporary folder, not yet renamed
  into place), ``published`` (renamed into place, the previous output not yet removed) and
  ``block-saved-N`` (block ``N`` is recorded in the work folder);
* ``PRUNELLA_FAULT=bytes:FILE:N`` -- killed once ``N`` bytes of the file named ``FILE``
  (its final name; it is written under a temporary one) have reached the disk.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "PRUNELLA_FAULT"


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fault_point(step: str) -> None:
    """Die here if ``PRUNELLA_FAULT`` names this step."""
    if os.environ.get(VARIABLE) == f"step:{step}":
        _kill()


def write(handle, data, name: str) -> None:
    """``handle.write(data)``; with ``PRUNELLA_FAULT=bytes:name:N``, die once ``N`` bytes of
    the file are written (the bytes before the cut are flushed to the disk first)."""
    fault = os.environ.get(VARIABLE, "")
    if not fault.startswith(f"bytes:{name}:"):
        handle.write(data)
        return
    limit = int(fault.rsplit(":", 1)[1])
    view = memoryview(data).cast("B")
    room = limit - handle.tell()
    if room > len(view):
        handle.write(view)
        return
    handle.write(view[: max(room, 0)])
    handle.flush()
    os.fsync(handle.fileno())
    _kill()
