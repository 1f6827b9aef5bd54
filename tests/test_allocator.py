"""Freed memory kept for reuse after a CPU load (blip2.allocator), in fresh processes (it is process-wide)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

import blip2
import blip2.api

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")

# Where a 20 MB temporary lives: inside the heap (brk) or a mapping of its own, and whether the heap still
# holds it once freed (so the next temporary reuses its pages instead of faulting fresh ones in).
TEMPORARY = textwrap.dedent(
    """
    import torch
    from blip2.allocator import keep_freed_memory

    def heap():
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("[heap]"):
                return tuple(int(a, 16) for a in line.split()[0].split("-"))
        return 0, 0

    raised = keep_freed_memory()
    t = torch.empty(5 << 20)
    t.fill_(1.0)
    start = t.data_ptr()
    low, high = heap()
    inside = low <= start < high
    del t
    low, high = heap()
    print(raised, inside, low <= start and start + (20 << 20) <= high)
    """
)


def _temporary(keep: str) -> list[str]:
    env = dict(os.environ, BLIP2_KEEP_FREED_MEMORY=keep)
    out = subprocess.run(
        [sys.executable, "-c", TEMPORARY], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@glibc
def test_freed_temporaries_stay_in_the_heap_for_reuse():
    # (counting page faults instead was flaky: glibc's heap can grow once more in any run)
    assert _temporary("1") == ["True", "True", "True"]


@glibc
def test_opting_out_leaves_glibc_mapping_and_unmapping_them():
    assert _temporary("0") == ["False", "False", "False"]


def test_a_cpu_load_keeps_freed_memory(opt_ckpt, monkeypatch):
    calls = []
    monkeypatch.setattr(blip2.api, "keep_freed_memory", lambda: calls.append(1))
    blip2.load(opt_ckpt)
    assert calls == [1]
