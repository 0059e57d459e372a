"""Process-wide CPU settings that make the 3D convolutional models fast on small machines.

- ``tune_allocator()``: glibc's default malloc returns every large buffer to the kernel on
  ``free`` and maps it again on the next ``malloc``; a 3D network allocates hundreds of MB per
  layer, so it spends much of its time in page faults. Raising the mmap / trim thresholds
  (``mallopt``, as the ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``
  environment variables would) keeps freed memory in the heap for reuse. It costs peak RSS
  (freed memory is kept), and is measured in ``benchmarks/bench_vae.py``.
- ``tune_cpu(threads)``: the allocator plus ``torch.set_num_threads``. On a 2-core machine that
  other programs also use, one intra-op thread can be faster than two (OpenMP threads wait for
  each other at every op); the benchmark records both.

- ``single_thread_blas()``: numpy's BLAS (OpenBLAS) to one thread. The engine's numpy linear
  algebra is small (the quick plan's optimiser: ~5,000 variables, a few ms a call), where
  OpenBLAS's threads cost more than they give: a moved beam's quick plan took 0.17 s with two
  and 0.12 s with one on a 2-core machine, beside a DiT that wants both cores anyway.

Call once at start-up, before the first large allocation. Linux/glibc only; elsewhere the
allocator step is a no-op that returns ``False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch
from threadpoolctl import threadpool_limits

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: the largest value, 2 GiB
TOP_PAD_BYTES = 1 << 30


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator() -> bool:
    """Keep freed heap memory for reuse (glibc ``mallopt``); ``True`` when applied."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    ok &= libc.mallopt(M_TOP_PAD, TOP_PAD_BYTES) == 1
    return bool(ok)


def tune_cpu(threads: int | None = None) -> bool:
    """Apply ``tune_allocator`` and, when given, ``torch.set_num_threads(threads)``."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return tune_allocator()


def single_thread_blas() -> None:
    """Limit numpy's BLAS to one thread for the rest of the process (threadpoolctl)."""
    threadpool_limits(limits=1, user_api="blas")
