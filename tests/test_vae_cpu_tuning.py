"""The allocator tuning really changes where glibc serves large blocks from (in a subprocess)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cpu_tuning import single_thread_blas, tune_cpu

PROBE = r"""
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tuned":
    from engine.cpu_tuning import tune_allocator
    assert tune_allocator()
block = libc.malloc(256 << 20)
held = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(held.hblkhd, after.arena)
"""


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                    reason="mallopt tuning is glibc-specific")
def test_large_blocks_come_from_the_heap_and_stay_after_tuning():
    def run(mode: str) -> tuple[int, int]:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                             check=True, env=env)
        mmapped, arena = map(int, out.stdout.split())
        return mmapped, arena

    mmapped, arena = run("default")
    assert mmapped >= 256 << 20  # glibc default: a 256 MB block is its own mmap
    mmapped, arena = run("tuned")
    # served from the heap and kept after free (earlier imports may hold a few small mmaps)
    assert mmapped < 256 << 20 and arena >= 256 << 20


def test_threads_are_set_and_checked():
    import torch

    before = torch.get_num_threads()
    try:
        tune_cpu(threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        tune_cpu(threads=0)


def test_numpys_blas_is_limited_to_one_thread():
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(limits=2, user_api="blas")
    single_thread_blas()
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    assert blas and all(i["num_threads"] == 1 for i in blas)
