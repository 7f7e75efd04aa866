"""Process-level settings for the training process (never applied at import time).

glibc's malloc hands large blocks back to the kernel on free (blocks above its mmap threshold,
and the heap's free top above the trim threshold), so every training step that allocates the
same big activations again pays fresh page faults for them (``bench/bilm_throughput.py``
with and without ``ELMO_NEWS_MALLOC_TUNING=0`` measures the difference). ``tune_allocator`` keeps freed memory in the
process instead; the price is that the resident size stays near its peak until the process ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

ENV_SWITCH = "ELMO_NEWS_MALLOC_TUNING"  # "0" leaves glibc's defaults alone

_SETTINGS = (
    (M_MMAP_THRESHOLD, 1 << 30),  # blocks below 1 GiB come from the heap, not fresh mmaps
    (M_TRIM_THRESHOLD, (1 << 31) - 1),  # never give the heap's free top back to the kernel
    (M_TOP_PAD, 256 << 20),  # grow the heap in 256 MiB steps
)


def tune_allocator() -> bool:
    """Keep freed memory for reuse (Linux with glibc); True when the settings were applied.

    A no-op returning False elsewhere (macOS, musl) or when ``ELMO_NEWS_MALLOC_TUNING=0``.
    Idempotent; affects the whole process, threads included.
    """
    if os.environ.get(ENV_SWITCH, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
