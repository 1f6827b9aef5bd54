"""Keeping freed memory in the process between inference calls (glibc's malloc).

A CPU forward pass makes temporaries of megabytes each (the small shape's image encoder: a 12 MB MLP
activation a layer for 4 images). glibc gives freed blocks that large back to the kernel -- blocks above
its mmap threshold are unmapped, and a free top of the heap above its trim threshold is trimmed -- so the
next layer and the next call take a page fault for every 4 KB of them again: ~13,000 faults a 4-image
caption at the small shape, which made the image encoder ~20 % slower. After a model is loaded for the
CPU, :func:`keep_freed_memory` raises both thresholds, so freed blocks stay in the heap for reuse. The
process's peak memory is unchanged (its live temporaries are the same); what it keeps after a call
stays at that peak instead of shrinking. ``BLIP2_KEEP_FREED_MEMORY=0`` leaves glibc's settings alone.
Loading gives its temporaries back itself (``blip2.quantize.memory.trim_heap``), whatever the setting.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above 32 MiB on 64-bit systems (HEAP_MAX_SIZE / 2); larger blocks are
# still mapped and unmapped each time, but their page faults are a smaller share of the work they feed
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
ENV = "BLIP2_KEEP_FREED_MEMORY"

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process (see the module's docstring).

    Returns whether they are raised: False with ``BLIP2_KEEP_FREED_MEMORY=0`` or another C library.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
            return False
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False
    log.debug("glibc malloc keeps freed blocks up to %d MiB: %s", MMAP_THRESHOLD >> 20, _done)
    return _done
