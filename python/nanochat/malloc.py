"""glibc malloc settings for CPU training (`tune()`), applied by the trainer and benches.

A training step allocates and frees the same few-MiB activation tensors hundreds of times.
glibc serves blocks above its mmap threshold with fresh mmap()s and trims a free heap top
back to the OS, so those tensors' pages are faulted in and zeroed again every step, and
element-wise ops on them pay for it. Pinning the mmap threshold at its maximum
(32 MiB) and raising the trim threshold keeps such blocks in the heap for reuse: a tiny
step faults in only its 32 MiB blocks (tests/test_malloc.py counts the pages) and runs
1.15x faster;
nano_125m's steps do not change beyond noise (`nanochat bench train --compare malloc`,
docs/benchmarks.md). This is what PyTorch's CPU tuning guide gets from jemalloc/tcmalloc via
LD_PRELOAD, without a preload. Blocks of 32 MiB and more (tiny's logits) still go to mmap.
Set NANOCHAT_MALLOC_TUNE=0 to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


@functools.cache
def tune() -> bool:
    """Apply the settings once per process; True when glibc accepted all three."""
    if os.environ.get("NANOCHAT_MALLOC_TUNE", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                (_M_TOP_PAD, TOP_PAD)))
