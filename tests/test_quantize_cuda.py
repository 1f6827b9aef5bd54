"""The GPU's int8 / int4 packings, checked on the CPU: the numbers each layer stores, their layout
against PyTorch's own int4 kernel, the bytes they take, and a quantized model's logits. The CUDA
kernels themselves (tinygemm, int8pack, bitsandbytes) run in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blip2
from blip2.errors import DependencyError, InputError
from blip2.quantize.cuda import (
    CudaInt4Linear,
    CudaInt8Linear,
    check_kernel,
    int4_group,
    pack_nibbles,
    quantizable,
    quantize_int4,
    quantize_layer,
    quantize_model_,
    quantized_bytes,
    unpack_nibbles,
)
from factory import make_images

CPU = torch.device("cpu")


def _linear(out_features=48, in_features=256, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(3).add_(torch.linspace(-1, 1, in_features))  # uneven groups
    return layer.to(dtype)


def test_int4_codes_scales_and_zeros():
    weight = _linear().weight.detach()
    q, sz = quantize_int4(weight, 64)
    assert q.dtype == torch.uint8 and q.shape == weight.shape and int(q.max()) <= 15
    assert sz.shape == (256 // 64, 48, 2) and sz.dtype == torch.bfloat16
    scale, zero = sz[..., 0].float().t(), sz[..., 1].float().t()  # (out, G)
    back = (q.float().view(48, 4, 64) - 8) * scale[..., None] + zero[..., None]
    err = (back.view(48, 256) - weight).abs().view(48, 4, 64).amax(-1)
    # half a step, plus what rounding the range ends to bfloat16 moves them
    assert bool((err <= 0.5 * scale + 0.01 * scale.abs() * 8 + 1e-6).all())
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    assert torch.equal(pack_nibbles(q)[:, 0] >> 4, q[:, 0])  # even inputs in the high nibble


def test_int4_layout_is_pytorchs_int4_convention():
    """PyTorch's CPU int4 kernel reads the same codes and (scale, zero) groups as tinygemm on CUDA."""
    layer = _linear(out_features=64, in_features=256)
    q, sz = quantize_int4(layer.weight, 128)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    theirs = torch._weight_int4pack_mm_for_cpu(x, packed, 128, sz).float()
    ours = CudaInt4Linear(pack_nibbles(q), sz, None, 256, 128, "dequant")
    assert torch.allclose(ours(x.float()), theirs, rtol=0.02, atol=0.05 * theirs.abs().max().item())
    # the weight itself: their kernel times the identity
    theirs_weight = torch._weight_int4pack_mm_for_cpu(torch.eye(256, dtype=torch.bfloat16), packed, 128, sz)
    assert torch.allclose(ours.dequantized().t(), theirs_weight.float(), atol=0.02, rtol=0.01)


@pytest.mark.parametrize("bias", [True, False])
def test_layers_multiply_by_their_dequantized_weight(bias):
    layer = _linear(bias=bias)
    x = torch.randn(2, 5, 256)
    for q in (quantize_layer(layer, 8, CPU, "dequant"), quantize_layer(layer, 4, CPU, "dequant")):
        expected = F.linear(x, q.dequantized(), None if q.bias is None else q.bias)
        assert torch.allclose(q(x), expected, atol=1e-4)
        rel = (q.dequantized() - layer.weight).norm() / layer.weight.norm()
        assert rel < (0.01 if isinstance(q, CudaInt8Linear) else 0.15)


def test_half_precision_layers_keep_the_activations_dtype():
    layer = _linear(dtype=torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    for bits in (8, 4):
        q = quantize_layer(layer, bits, CPU, "dequant")
        out = q(x)
        assert out.dtype == torch.bfloat16
        cos = F.cosine_similarity(out.float(), layer(x).float(), dim=-1)
        assert cos.min() > (0.999 if bits == 8 else 0.95)


def test_shapes_int4_cannot_take_stay_int8():
    assert int4_group(4096, 4096) == 128 and int4_group(1408, 6144) == 128 and int4_group(96, 64) == 32
    assert int4_group(48, 64) is None and int4_group(256, 32001) is None
    assert isinstance(quantize_layer(_linear(in_features=48), 4, CPU, "dequant"), CudaInt8Linear)


@pytest.mark.parametrize(("bits", "bias", "dtype"), [(8, True, torch.float16), (4, True, torch.bfloat16),
                                                     (4, False, torch.float16), (8, False, torch.float32)])  # fmt: skip
def test_byte_counts_are_what_the_layers_hold(bits, bias, dtype):
    layer = _linear(out_features=64, in_features=256, bias=bias, dtype=dtype)
    q = quantize_layer(layer, bits, CPU, "dequant")
    held = sum(t.numel() * t.element_size() for t in q.buffers())
    assert held == quantized_bytes(64, 256, bias, layer.weight.element_size(), bits)
    # tinygemm's int32 tiles hold the same bytes as two codes per byte
    assert quantized_bytes(64, 256, bias, 2, 4, "tinygemm") == quantized_bytes(64, 256, bias, 2, 4, "dequant")


def test_kernels_that_cannot_run_here_are_clear_errors():
    with pytest.raises(ValueError, match="must be one of"):
        check_kernel(8, "marlin")
    if not torch.cuda.is_available():
        with pytest.raises(DependencyError, match="_weight_int4pack_mm on CUDA"):
            check_kernel(4, "tinygemm")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(DependencyError, match="pip install bitsandbytes"):
            check_kernel(8, "bnb")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="sees no CUDA device"):
            blip2.load("demo", device="cuda", quantize="int8")
    with pytest.raises(ValueError, match="kernels are chosen for CUDA layers"):
        blip2.load("demo", quantize="int4:tinygemm")
    with pytest.raises(ValueError, match="group_size is for the CPU's int4 layers"):
        blip2.load("demo", device="auto", quantize="int4", group_size=256)
    with pytest.raises(ValueError, match="quantize must be None, 'int8' or 'int4'"):
        blip2.load("demo", quantize="int3")
    with pytest.raises(ValueError, match="int8 kernel must be one of"):
        blip2.load("demo", quantize="int8:marlin")


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_quantized_model_logits_stay_close(lm, opt_ckpt, t5_ckpt):
    path = {"opt": opt_ckpt, "t5": t5_ckpt}[lm]
    ref = blip2.load(path)
    inputs = ref.processor(
        images=make_images(2, seed=5), text=["a photo of", "question: what is it? answer:"]
    )
    if lm == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    with torch.no_grad():
        expected = ref.model(**inputs).logits
    for bits, floor in ((8, 0.998), (4, 0.85)):
        pipe = blip2.load(path)
        layers = len(list(quantizable(pipe.model)))
        # every covered layer, with the CUDA packings (the CPU runs their "dequant" kernels)
        for path_, layer in list(quantizable(pipe.model)):
            parent, _, name = path_.rpartition(".")
            setattr(pipe.model.get_submodule(parent), name, quantize_layer(layer, bits, CPU, "dequant"))
        assert not list(quantizable(pipe.model)) and layers > 10
        with torch.no_grad():
            got = pipe.model(**inputs).logits
        cos = F.cosine_similarity(got.flatten(0, -2), expected.flatten(0, -2), dim=-1)
        assert cos.min() > floor, (bits, cos.min())
        assert not torch.equal(got, expected)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_for_the_cpu_part_of_a_placement_uses_the_cpu_kernels(opt_ckpt, bits):
    """A placement's CPU layers get ``blip2.quantize``'s layers (int4: the Q-Former's int8), as
    ``load(quantize=...)`` on the CPU: the same tokens."""
    from blip2.quantize import Int4Linear, Int8Linear

    cpu = blip2.load(opt_ckpt, quantize=f"int{bits}")
    pipe = blip2.load(opt_ckpt)
    assert quantize_model_(pipe.model, bits, lambda _: "cpu") == len(
        list(quantizable(blip2.load(opt_ckpt).model))
    )
    kinds = {name: type(m) for name, m in pipe.model.named_modules()}
    assert kinds == {name: type(m) for name, m in cpu.model.named_modules()}
    assert not any(isinstance(m, CudaInt8Linear | CudaInt4Linear) for m in pipe.model.modules())
    assert Int8Linear in kinds.values() and (Int4Linear in kinds.values()) == (bits == 4)
    images = make_images(2, seed=6)
    assert pipe.generate_ids(images, "a photo of", max_new_tokens=6) == cpu.generate_ids(
        images, "a photo of", max_new_tokens=6
    )


def test_cuda_layers_follow_the_cpus_choice_of_bits(opt_ckpt):
    """Under int4 the Q-Former's layers are int8 on a non-CPU device too, as on the CPU
    (``blip2.quantize.cuda.layer_bits``); the meta device stands in for CUDA (shapes only)."""
    pipe = blip2.load(opt_ckpt)
    quantize_model_(pipe.model, 4, lambda _: "meta", "dequant")
    layers = {n: m for n, m in pipe.model.named_modules() if isinstance(m, CudaInt8Linear | CudaInt4Linear)}
    assert layers and all(m.qweight.is_meta if isinstance(m, CudaInt8Linear) else m.packed.is_meta
                          for m in layers.values())  # fmt: skip
    for name, layer in layers.items():
        int4_here = not name.startswith("qformer") and int4_group(layer.in_features, layer.out_features)
        assert isinstance(layer, CudaInt4Linear if int4_here else CudaInt8Linear), name
    assert any(isinstance(m, CudaInt4Linear) for m in layers.values())


def test_cuda_layers_are_not_saved_as_a_float_checkpoint(opt_ckpt, tmp_path):
    """``Pipeline.save`` writes only the CPU's packings: a model holding CUDA layers is refused, not
    written as its float source."""
    pipe = blip2.load(opt_ckpt)
    quantize_model_(pipe.model, 8, lambda path: "meta" if path.startswith("language_model") else "cpu")
    with pytest.raises(ValueError, match="CUDA int8 / int4 layers are not saved"):
        pipe.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()
