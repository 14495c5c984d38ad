"""glibc malloc settings that keep a training process's large tensors off the page-fault path.

PyTorch's CPU tensors come from ``malloc``. With glibc's defaults a freed block above the mmap
threshold, or a large free block at the top of the heap, goes back to the OS, and the next tensor
of that size faults its pages in again (and the kernel zeroes them). A training step frees and
re-allocates the same large activations every time, so on CPU that cost recurs each step;
attention modules, which add full-size activations, pay the most.
"""

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's upper limit
TRIM_THRESHOLD = 2**31 - 1


def keep_heap() -> bool:
    """Serve blocks up to glibc's largest mmap threshold (32 MiB) from the heap, never trim it.

    The process keeps the memory it has used at its peak instead of handing it back between
    steps. Returns False, changing nothing, where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    # the mmap threshold first: a trim threshold alone fixes the mmap threshold at 128 KiB
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
