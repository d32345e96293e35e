"""Host memory: give what a stage frees back to the operating system.

glibc serves large allocations from mmap only up to a threshold it raises to the size of the largest block freed
so far, after which same-sized blocks (activations, logit chunks, optimizer temporaries) come from its heap arenas,
one per thread, and stay there when freed: a process that trains one model after another only ever grows. Measured
on teacher correction of SmolLM2-135M on CPU: a 5.1 GB peak with the dynamic threshold, 4.4 GB with a fixed one, and
after the stage 1.0 GB instead of 3.6 GB stays resident.
"""

from __future__ import annotations

import ctypes
import sys

MMAP_THRESHOLD = 1 << 20  # blocks from 1 MiB up are mmapped, and unmapped when freed
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def _libc():
    return ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def return_freed_memory() -> None:
    """Fix glibc's mmap threshold for this process (call once, early; no effect outside glibc)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim() -> None:
    """Return free heap pages to the OS now (after a stage's models are gone)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
