"""glibc heap settings that keep a long prune's resident memory flat without slowing it.

Each block's forward allocates and frees the same few activation sizes thousands of
times. Served from fresh ``mmap`` s (glibc's behaviour for blocks over its mmap
threshold, 128 KiB at first), every allocation faults its pages in again: on a
SmolLM2-135M prune with a 1 MiB threshold that was 13 million page faults and about
a third of the wall time. Served from the heap, they are reused, but the heap keeps
the pages of every hole its freed temporaries leave. So: a fixed 32 MiB threshold
(per-batch activations live in the heap and are reused), one arena (the GEMM
library's worker threads would otherwise each grow a heap of their own), and
:func:`trim_heap` after each layer's solve and each block, when the holes' pages go
back to the system. With one pass, where every batch waits at each layer holding
its activations, the per-layer trim took a SmolLM2-135M Wanda prune from about
900 to about 730 MiB peak RSS for about 2 s of page faults. docs/heap.md
(``benchmarks/heap_settings.py``) has the measurements. The pipeline applies these
settings at the start of every run, so API users get them as the CLI does.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameters, from glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20
ARENA_MAX = 1


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
            libc.mallopt(M_ARENA_MAX, ARENA_MAX)


def trim_heap() -> None:
    """Return the heap's free pages to the system (``malloc_trim``; no-op off glibc)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(OSError):
            libc.malloc_trim(0)
