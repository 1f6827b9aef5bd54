"""The native few-row linear kernel (blip2.native): equal to F.linear, batch-invariant, optional."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import blip2
from blip2 import layers, native
from factory import make_images


@pytest.fixture
def kernel():
    found = native.skinny_linear_kernel()
    if found is None:
        pytest.skip("no native kernel on this machine (see blip2.native)")
    return found


def _can_build() -> bool:
    return native._unsupported_reason() is None and native._compiler() is not None


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A cold cache and a fresh attempt at building the kernel; the process's kernel is restored after."""
    monkeypatch.setenv("BLIP2_CACHE", str(tmp_path))
    native.skinny_linear_kernel.cache_clear()
    yield tmp_path
    native.skinny_linear_kernel.cache_clear()


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 33])
@pytest.mark.parametrize("in_features,out_features", [(8, 1), (24, 7), (64, 130), (1024, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear(kernel, rows, in_features, out_features, bias):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    torch.testing.assert_close(
        native.skinny_linear(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5
    )


def test_leading_dimensions_and_strided_input(kernel):
    weight, bias = torch.randn(40, 32), torch.randn(40)
    x = torch.randn(2, 6, 32)[:, ::2]  # not contiguous, 2 x 3 rows
    got = native.skinny_linear(x, weight, bias)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_row_is_the_same_alone_in_a_batch_and_on_any_thread_count(kernel):
    weight, bias = torch.randn(301, 256), torch.randn(301)
    batch = torch.randn(11, 256)
    threads = torch.get_num_threads()
    try:
        together = native.skinny_linear(batch, weight, bias)
        torch.set_num_threads(1)
        alone = torch.cat([native.skinny_linear(row[None], weight, bias) for row in batch])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)


def test_rejects_what_it_cannot_run(kernel):
    with pytest.raises(ValueError, match="multiple of 8"):
        native.skinny_linear(torch.randn(2, 12), torch.randn(3, 12), None)
    weight = torch.randn(3, 16)
    for x, w, b in [
        (torch.randn(2, 8), weight, None),  # the wrong width
        (torch.randn(2, 16, dtype=torch.float64), weight, None),
        (torch.randn(2, 16), weight.t().contiguous().t(), None),  # a strided weight
        (torch.randn(2, 16), weight, torch.randn(4)),
        (torch.randn(2, 16), weight, torch.randn(3).half()),
    ]:
        with pytest.raises(ValueError, match="contiguous float32 CPU tensors"):
            native.skinny_linear(x, w, b)


def test_linear_takes_it_for_few_rows_only(kernel, monkeypatch):
    calls: list[int] = []
    real = native.skinny_linear

    def counting(x, weight, bias, kernel=None):
        y = real(x, weight, bias, kernel)
        calls.append(x.numel() // x.shape[-1])  # the calls it ran, not the ones it refused
        return y

    monkeypatch.setattr(native, "skinny_linear", counting)
    layer, odd = layers.Linear(64, 48), layers.Linear(60, 8)
    with torch.inference_mode():
        for rows in (1, layers.SKINNY_MAX_ROWS, layers.SKINNY_MAX_ROWS + 1):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        odd(torch.randn(2, 60))  # in_features not a multiple of 8
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            layer(torch.randn(2, 32))  # the wrong width: the error nn.Linear gives
    x = torch.randn(2, 64)
    layer(x)  # gradients wanted: nn.Linear's own path
    assert calls == [1, layers.SKINNY_MAX_ROWS]


def test_captions_run_on_it_and_equal_the_exact_path(kernel, opt_ckpt, monkeypatch):
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


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/cc"])
def test_a_failed_build_leaves_pytorchs_kernel(fresh_build, monkeypatch, caplog, compiler):
    if native._unsupported_reason() is not None:
        pytest.skip(native._unsupported_reason())
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setattr(native.shutil, "which", lambda name: name if name == "false" else None)
    with caplog.at_level(logging.INFO, logger="blip2.native"):
        assert native.skinny_linear_kernel() is None
    assert "PyTorch's kernel" in caplog.text
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
