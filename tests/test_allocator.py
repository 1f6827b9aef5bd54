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

# Page faults of steps 3-8 of a loop making two 20 MB temporaries a step, as a layer does.
CHURN = textwrap.dedent(
    """
    import resource, torch
    from blip2.allocator import keep_freed_memory
    print(keep_freed_memory())
    x = torch.randn(1 << 20)
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        h = torch.mul(x.repeat(5), 2.0)
        g = torch.nn.functional.gelu(h)
        float(g.sum())
        del h, g
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sum(faults[2:]))
    """
)


def _churn(keep: str) -> tuple[str, int]:
    env = dict(os.environ, BLIP2_KEEP_FREED_MEMORY=keep)
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, check=True)
    raised, faults = out.stdout.split()
    return raised, int(faults)


@glibc
def test_freed_blocks_are_reused_without_page_faults():
    raised, faults = _churn("1")
    assert raised == "True"
    assert faults < 1_000  # each step's 40 MB would be ~10,000 pages


@glibc
def test_opting_out_leaves_glibcs_settings():
    # glibc's own thresholds adapt to the sizes freed, so how many faults its defaults take varies from
    # run to run (from ~10,000 to ~60,000 here): only the opt-out itself is held
    raised, _ = _churn("0")
    assert raised == "False"


def test_a_cpu_load_keeps_freed_memory(opt_ckpt, monkeypatch):
    calls = []
    monkeypatch.setattr(blip2.api, "keep_freed_memory", lambda: calls.append(1))
    blip2.load(opt_ckpt)
    assert calls == [1]
