"""Large buffers go back to the operating system as soon as they are freed.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB by default), so
later payloads of a few MiB come from the heap arenas, which keep them: a service serving HTTP
grew by 452 MiB over forty rounds of an 8 MiB output and an 8 MiB file, and by 151 MiB over
24 rounds of 64 MiB (10 and 9 MiB with this; tests/test_scale.py). A fixed threshold (which turns
the raising off) returns every block of a mebibyte or more when it is freed, at the price of an
mmap per such block.
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
