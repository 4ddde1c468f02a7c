"""Large buffers go back to the operating system as soon as they are freed.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB by default), so
after a few 64 MiB payloads later ones come from the heap arenas, which keep them: a service
serving HTTP grew by 64 MiB per payload, to +287 MiB after eight 64 MiB outputs and files
(bench/bench_scale.py --parts memory). A fixed threshold (which turns the raising off) returns
every block of a mebibyte or more when it is freed, at the price of an mmap per such block.
"""

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks() -> bool:
    """Set the threshold for this process; False where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
