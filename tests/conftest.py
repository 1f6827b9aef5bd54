"""Shared fixtures: small random reference checkpoints (built once per session) and the `slow` marker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factory import build_checkpoint  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("BLIP2_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow or set BLIP2_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _build(factory, name: str, **kwargs) -> Path:
    return build_checkpoint(factory.mktemp(name), **kwargs)


@pytest.fixture(scope="session")
def opt_ckpt(tmp_path_factory) -> Path:
    """OPT generation checkpoint: safetensors, one file, lm_head written explicitly."""
    return _build(tmp_path_factory, "opt", lm="opt")


@pytest.fixture(scope="session")
def t5_ckpt(tmp_path_factory) -> Path:
    """Flan-T5 style generation checkpoint (untied lm_head, gated GELU)."""
    return _build(tmp_path_factory, "t5", lm="t5")


@pytest.fixture(scope="session")
def t5_asym_ckpt(tmp_path_factory) -> Path:
    """T5 with 2 encoder and 3 decoder layers (the reference's generate crashes on it)."""
    return _build(tmp_path_factory, "t5_asym", lm="t5", lm_layers=2, t5_decoder_layers=3)


@pytest.fixture(scope="session")
def itm_ckpt(tmp_path_factory) -> Path:
    """Blip2ForImageTextRetrieval checkpoint (blip2-itm-vit-g layout, BERT WordPiece tokenizer)."""
    return _build(tmp_path_factory, "itm", retrieval=True)


@pytest.fixture(scope="session")
def opt_legacy_ckpt(tmp_path_factory) -> Path:
    """Same tensors as `opt_ckpt`; config without image_token_index, processor without num_query_tokens."""
    return _build(tmp_path_factory, "opt_legacy", lm="opt", legacy_config=True)


@pytest.fixture(scope="session")
def opt_sharded_bin_ckpt(tmp_path_factory) -> Path:
    """Same tensors as `opt_ckpt` minus the tied lm_head, as sharded pytorch_model-*.bin + index."""
    return _build(
        tmp_path_factory,
        "opt_sharded_bin",
        lm="opt",
        weights_format="bin",
        max_shard_size="100KB",
        drop_lm_head=True,
    )


@pytest.fixture(scope="session")
def opt_sharded_st_ckpt(tmp_path_factory) -> Path:
    """Same tensors as `opt_ckpt` minus the tied lm_head, as sharded model-*.safetensors + index."""
    return _build(tmp_path_factory, "opt_sharded_st", lm="opt", max_shard_size="100KB", drop_lm_head=True)


def reset_kernel_choice() -> None:
    """Forget the process's float32 kernel choice (and built kernels): the next use decides again."""
    from blip2 import native
    from blip2.models import layers
    from blip2.quantize import int4, int8

    native.skinny_linear_kernel.cache_clear()
    native.decode_attention_kernel.cache_clear()
    native.decoder_step_kernel.cache_clear()
    native.encoder_attention_kernel.cache_clear()
    native.t5_decoder_step_kernel.cache_clear()
    native.llama_decoder_step_kernel.cache_clear()
    layers.float32_kernel.cache_clear()
    int4.native_fit_kernel.cache_clear()
    int8.native_pack_kernel.cache_clear()


def kernel_of_kind(kind: str, monkeypatch, load, what: str):
    """For a fixture over the native kinds: ``load()`` (a native kernel loader) with the process switched
    to ``kind``, skipped where the CPU lacks it; the process's own choice comes back after. Where a C
    compiler exists, a kernel that fails to build or its self-check is a failure, not a skip."""
    from blip2 import native

    if (reason := native._unsupported_reason(kind)) is not None:
        pytest.skip(reason)
    monkeypatch.setenv("BLIP2_NATIVE", kind)
    reset_kernel_choice()
    built = load()
    if built is None and native._compiler() is None:
        pytest.skip(f"no native {kind} {what} here: no C compiler")
    assert built is not None, f"the {kind} {what} failed to build or its self-check (see the log)"
    assert native.kernel_kind() == kind
    yield built
    reset_kernel_choice()


def kind_fixture(load, what: str):
    """A fixture over the native kinds for a test module: the kernel ``load()`` gives on each kind the CPU
    has, for one test (:func:`kernel_of_kind`); the process's own choice comes back after."""

    @pytest.fixture(params=["avx2", "avx512"])
    def kernel(request, monkeypatch):
        yield from kernel_of_kind(request.param, monkeypatch, load, what)

    return kernel


def count_rows(monkeypatch, name: str, build) -> list[int]:
    """The rows of each call of ``blip2.native.<name>`` (a decoder step) from now on, in a list.
    ``build()`` builds and self-checks its kernel first: those calls are not counted."""
    from blip2 import native

    calls: list[int] = []
    build()
    real = getattr(native, name)

    def counted(kernel, decoder, x, *args):
        calls.append(x.shape[0])
        return real(kernel, decoder, x, *args)

    monkeypatch.setattr(native, name, counted)
    return calls


def assert_steps_match_layers(native_logits, layered) -> None:
    """Teacher-forced logits (B, steps, V) of a native decoder step against its layers run one by one:
    its norms and activations round differently in their last bits, so close, not equal: cosine above
    0.9999 at every step and the same argmax."""
    import torch
    import torch.nn.functional as F

    cos = F.cosine_similarity(native_logits, layered, dim=-1)
    assert cos.min() > 0.9999, cos
    assert torch.equal(native_logits.argmax(-1), layered.argmax(-1))


@pytest.fixture(params=["avx2", "avx512"])
def native_kind(request, monkeypatch) -> str:
    """Linear layers on the native kernel of each kind the CPU has, for one test; the process's own
    choice comes back after."""
    from blip2 import native
    from blip2.models import layers

    kind = request.param
    if (reason := native._unsupported_reason(kind)) is not None:
        pytest.skip(reason)
    monkeypatch.setenv("BLIP2_NATIVE", kind)
    reset_kernel_choice()
    if layers.float32_kernel()[0] != "native":
        pytest.skip(f"no native {kind} kernel here (no C compiler?)")
    yield kind
    reset_kernel_choice()


@pytest.fixture(scope="session")
def instruct_llama_ckpt(tmp_path_factory) -> Path:
    """InstructBLIP with a LLaMA of grouped-query attention (4 query heads, 2 key/value heads)."""
    from factory_instruct import build_instruct_checkpoint

    return build_instruct_checkpoint(tmp_path_factory.mktemp("instruct_llama"), lm="llama", lm_kv_heads=2)


@pytest.fixture(scope="session")
def instruct_t5_ckpt(tmp_path_factory) -> Path:
    """InstructBLIP with a Flan-T5."""
    from factory_instruct import build_instruct_checkpoint

    return build_instruct_checkpoint(tmp_path_factory.mktemp("instruct_t5"), lm="t5", seed=2)


@pytest.fixture(scope="module", params=["opt", "t5", "llama", "instruct_t5"])
def lm_kind_ckpt(request) -> tuple[str, Path]:
    """(kind, checkpoint) for each language model the placement and static-decode tests cover: OPT, T5,
    and InstructBLIP's LLaMA and Flan-T5."""
    name = {
        "opt": "opt_ckpt",
        "t5": "t5_ckpt",
        "llama": "instruct_llama_ckpt",
        "instruct_t5": "instruct_t5_ckpt",
    }
    return request.param, request.getfixturevalue(name[request.param])
