"""Giving memory back while a model is quantized, so that its float32 weights are never resident at once.

The float32 pages of each weight are handed back to the kernel (``madvise(MADV_DONTNEED)`` on the
private file mapping: they refault from the file if read again) as soon as its low-bit copy exists, and
glibc's heap is trimmed of the freed temporaries.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = None


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of read-only-so-far file mappings of weight files in this process."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith((".safetensors", ".bin")):
                    lo, hi = (int(a, 16) for a in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


def release(t: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Drop this tensor's resident pages if it lies in a file mapping (they refault from the file)."""
    global _libc
    if not mappings or t.device.type != "cpu":
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not any(lo <= start and end <= hi for lo, hi in mappings):
        return  # anonymous memory: dropping it would lose the data
    lo = (start + _PAGE - 1) // _PAGE * _PAGE
    hi = end // _PAGE * _PAGE
    if hi <= lo:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Give the float32 temporaries' freed heap back to the system (glibc keeps it otherwise)."""
    try:
        libc = ctypes.CDLL(None)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
