"""The native float32 linear kernel (blip2.native): equal to F.linear, batch-invariant, optional."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import blip2
from blip2 import native
from blip2.errors import InputError
from blip2.models import layers
from conftest import reset_kernel_choice
from factory import make_images


@pytest.fixture
def kernel(native_kind):
    return native.skinny_linear_kernel(native_kind)


def _can_build() -> bool:
    return native._unsupported_reason(native.kernel_kind()) is None and native._compiler() is not None


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A cold cache and a fresh attempt at building the kernel; the process's kernel is restored after."""
    monkeypatch.setenv("BLIP2_CACHE", str(tmp_path))
    reset_kernel_choice()
    yield tmp_path
    reset_kernel_choice()


# widths: below, at and past a vector, a tail of every size class, past a 1024-wide chunk
@pytest.mark.parametrize(
    "in_features,out_features", [(1, 3), (8, 1), (24, 7), (37, 13), (64, 130), (1030, 96), (2056, 9)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear(kernel, in_features, out_features, bias):
    generator = torch.Generator().manual_seed(in_features + out_features)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    for rows in [0, 1, 2, 3, 4, 5, 6, 7, 9, 16, 33]:
        x = torch.randn(rows, in_features, generator=generator)
        torch.testing.assert_close(
            native.skinny_linear(x, weight, b, kernel), F.linear(x, weight, b), rtol=1e-5, atol=1e-5
        )


def test_leading_dimensions_and_strided_input(kernel):
    weight, bias = torch.randn(40, 32), torch.randn(40)
    x = torch.randn(2, 6, 32)[:, ::2]  # not contiguous, 2 x 3 rows
    got = native.skinny_linear(x, weight, bias, kernel)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_features", [256, 1100])
def test_a_row_is_the_same_alone_in_any_batch_and_on_any_thread_count(kernel, in_features):
    generator = torch.Generator().manual_seed(in_features)
    weight, bias = torch.randn(301, in_features, generator=generator), torch.randn(301, generator=generator)
    batch = torch.randn(600, in_features, generator=generator)
    threads = torch.get_num_threads()
    together = native.skinny_linear(batch, weight, bias, kernel)
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.skinny_linear(batch, weight, bias, kernel), together)
        alone = torch.cat([native.skinny_linear(row[None], weight, bias, kernel) for row in batch[:40]])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together[:40], alone)
    for rows in (2, 6, 7, 15, 16, 17, 255, 256, 257, 599):
        assert torch.equal(native.skinny_linear(batch[:rows], weight, bias, kernel), together[:rows]), rows


def test_rejects_what_it_cannot_run(kernel):
    weight = torch.randn(3, 16)
    for x, w, b in [
        (torch.randn(2, 8), weight, None),  # the wrong width
        (torch.randn(2, 16, dtype=torch.float64), weight, None),
        (torch.randn(2, 16), weight.t().contiguous().t(), None),  # a strided weight
        (torch.randn(2, 16), weight, torch.randn(4)),
        (torch.randn(2, 16), weight, torch.randn(3).half()),
        (torch.randn(2, 0), torch.randn(3, 0), None),
    ]:
        with pytest.raises(ValueError, match="contiguous float32 CPU tensors"):
            native.skinny_linear(x, w, b, kernel)


def test_linear_runs_it_for_every_row_count(native_kind, monkeypatch):
    calls: list[int] = []
    real = native.skinny_linear

    def counting(x, weight, bias, kernel=None):
        y = real(x, weight, bias, kernel)
        calls.append(x.numel() // x.shape[-1])  # the calls it ran, not the ones it refused
        return y

    monkeypatch.setattr(native, "skinny_linear", counting)
    layer, odd = layers.Linear(64, 48), layers.Linear(60, 8)
    with torch.inference_mode():
        for rows in (1, 17, 257, 1030):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        odd(torch.randn(2, 60))  # in_features not a multiple of the vector width
        with pytest.raises(InputError, match="input width 64.*shape \\(2, 32\\)"):
            layer(torch.randn(2, 32))
    x = torch.randn(2, 64)
    layer(x)  # gradients wanted: nn.Linear's own path
    assert calls == [1, 17, 257, 1030, 2]


def test_captions_run_on_it_and_equal_the_exact_path(opt_ckpt, monkeypatch):
    if layers.float32_kernel()[0] != "native":
        pytest.skip("no native kernel on this machine (see blip2.native)")
    calls = []
    real = native.skinny_linear
    monkeypatch.setattr(native, "skinny_linear", lambda *a: calls.append(1) or real(*a))
    images = make_images(3, seed=11)
    fast = blip2.load(opt_ckpt).caption(images, max_new_tokens=6)
    assert calls  # the decode steps went through the native kernel
    calls.clear()
    assert blip2.load(opt_ckpt, exact=True).caption(images, max_new_tokens=6) == fast
    assert not calls


def test_turned_off_by_environment(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("BLIP2_NATIVE", "0")
    with caplog.at_level(logging.INFO, logger="blip2.native"):
        assert native.skinny_linear_kernel() is None
    assert "BLIP2_NATIVE" in caplog.text
    assert layers.float32_kernel()[0] != "native"


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/cc"])
def test_a_failed_build_leaves_pytorchs_kernel(fresh_build, monkeypatch, caplog, compiler):
    if (reason := native._unsupported_reason(native.kernel_kind())) is not None:
        pytest.skip(reason)
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setattr(native.shutil, "which", lambda name: name if name == "false" else None)
    with caplog.at_level(logging.INFO, logger="blip2"):
        assert native.skinny_linear_kernel() is None
        assert layers.float32_kernel()[0] != "native"
    assert "no native" in caplog.text and "float32 linear layers run on" in caplog.text
    layer = layers.Linear(16, 8)
    x = torch.randn(2, 16)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert not list(fresh_build.rglob("*.so"))


def test_builds_once_into_the_cache(fresh_build, kernel):
    if not _can_build():
        pytest.skip("cannot build here")
    assert native.skinny_linear_kernel() is not None
    built = list(fresh_build.rglob("*.so"))
    assert len(built) == 1 and not list(fresh_build.rglob("*.tmp")) and not list(fresh_build.rglob("*.c"))
    mtime = built[0].stat().st_mtime_ns
    native.skinny_linear_kernel.cache_clear()
    assert native.skinny_linear_kernel() is not None
    assert built[0].stat().st_mtime_ns == mtime  # loaded from the cache, not rebuilt


def test_an_unwritable_cache_gives_way_to_the_temporary_folder(fresh_build, monkeypatch):
    if not _can_build():
        pytest.skip("cannot build here")
    blocker = fresh_build / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("BLIP2_CACHE", str(blocker / "cache"))  # under a file: cannot be made
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(fresh_build / "tmp"))
    assert native.skinny_linear_kernel() is not None
    assert [p.parent.parent.name for p in fresh_build.rglob("*.so")] == ["tmp"]


def test_a_folder_others_can_write_is_not_trusted(fresh_build, monkeypatch):
    if not _can_build():
        pytest.skip("cannot build here")
    shared = fresh_build / "cache" / "native"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    monkeypatch.setenv("BLIP2_CACHE", str(fresh_build / "cache"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(fresh_build / "tmp"))
    assert native.skinny_linear_kernel() is not None
    assert not list(shared.iterdir())  # nothing written or loaded there
    assert len(list((fresh_build / "tmp").rglob("*.so"))) == 1
