"""glibc heap settings that keep a long prune's resident memory flat without slowing it.

Each block's forward allocates and frees the same few activation sizes thousands of
times. Served from fresh ``mmap`` s (glibc's behaviour for blocks over its mmap
threshold, 128 KiB at first), every allocation faults its pages in again: on a
SmolLM2-135M prune with a 1 MiB threshold that was 13 million page faults and about
a third of the wall time. Served from the heap, they are reused, but glibc's heap
only shrinks from the top, so it can ratchet up block after block. The middle way:
a fixed 32 MiB threshold (per-batch activations live in the heap and are reused
within a block) and :func:`trim_heap` after each block (what the block freed goes
back to the system). README ("Heap and forward dtype", ``benchmarks/heap_settings.py``)
has the measurements, including a run where glibc's own dynamic threshold did as
well; single runs vary too much to choose between the two.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20


@functools.cache
def _libc():
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_heap_growth() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (no-op off glibc)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(OSError):
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim_heap() -> None:
    """Return the heap's free pages to the system (``malloc_trim``; no-op off glibc)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(OSError):
            libc.malloc_trim(0)
