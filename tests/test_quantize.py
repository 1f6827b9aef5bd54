"""Weight-only int8 / int4: the packings, the native kernels against the same arithmetic in PyTorch,
batched = alone, closeness to float32 on the test checkpoints, and `blip2.load(quantize=...)`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blip2
from blip2.models.layers import Linear
from blip2.quantize import Int4Linear, Int8Linear, kernels, pack_int4, plan, quantize_model_, quantize_weight
from blip2.quantize.int8 import fbgemm_available
from factory import make_images


def _native_kinds() -> list[int]:
    library = blip2.native.lowbit_library()
    if library is None or kernels.native_kind() is None:
        return []
    available = library.blip2_lowbit_cpu_kinds()
    return [kind for kind in kernels.KINDS.values() if available & kind]


NATIVE_KINDS = _native_kinds()
needs_native = pytest.mark.skipif(not NATIVE_KINDS, reason="no native low-bit kernel on this machine")


def test_quantize_weight_round_trip():
    w = torch.randn(64, 96)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())
    padded, _ = quantize_weight(w, 128)
    assert padded.shape == (64, 128) and torch.equal(padded[:, :96], q) and not padded[:, 96:].any()


def test_int8_blocked_layout():
    q = torch.randint(-127, 128, (37, 200), dtype=torch.int8)
    packed = kernels.block_int8(q, 256)
    assert packed.shape == (3, 64, 64)
    # vector v of block B holds q[16B + i, 4v + b] at byte 4i + b; padding is zero
    assert packed[1, 10, 4 * 5 + 2] == q[16 + 5, 40 + 2]
    assert packed[2, 0, 4 * 5] == 0 and packed[0, 55, 0] == 0  # output 37, input 220: padding
    assert torch.equal(kernels.unblock_int8(packed)[:37, :200], q)


@pytest.fixture(params=["native", "pytorch"])
def int4_fit(request, monkeypatch):
    """pack_int4 with the native fit (csrc/lowbit_linear.c), then with PyTorch's."""
    from blip2.quantize import int4

    if request.param == "native" and int4.native_fit_kernel() is None:
        pytest.skip("no native int4 fit here (no C compiler?)")
    if request.param == "pytorch":
        monkeypatch.setattr(int4, "native_fit_kernel", lambda: None)
    return request.param


@pytest.mark.parametrize("in_features,group", [(96, 128), (256, 128), (300, 256), (128, 128)])
def test_pack_int4_round_trip(in_features, group, int4_fit):
    w = torch.randn(33, in_features) * 0.1
    w[0, :10] = 3.0  # a group with an outlier
    qweight, scales, mins = pack_int4(w, group)
    padded = -(-in_features // group) * group
    assert qweight.shape == (3, padded // 8, 64) and qweight.dtype == torch.uint8
    assert scales.shape == mins.shape == (3, padded // group, 16) and scales.dtype == torch.float16
    q = kernels.unblock_int4(qweight)
    assert q.shape == (48, padded) and q.max() <= 15 and not q[33:].any()
    # byte 4i + b of vector v of block B: q[16B + i, 8v + b] (low nibble), q[16B + i, 8v + 4 + b] (high)
    byte = int(qweight[1, 3, 4 * 2 + 1])
    assert (byte & 15, byte >> 4) == (int(q[18, 25]), int(q[18, 29]))
    deq = kernels.int4_weight(qweight, scales, mins, 33)[:, :in_features]
    # against plain min-max rounding, group by group: never more squared error, never far off
    padded_w = F.pad(w, (0, padded - in_features)).view(33, -1, group)
    real = (torch.arange(padded) < in_features).view(-1, group)
    low = torch.where(real, padded_w, torch.inf).amin(-1, keepdim=True)
    high = torch.where(real, padded_w, -torch.inf).amax(-1, keepdim=True)
    step = (high - low) / 15
    plain = ((padded_w - low) / step).round().clamp(0, 15) * step + low
    plain_err = ((plain - padded_w) * real).square().sum(-1)
    err = (F.pad(deq - w, (0, padded - in_features)).view(33, -1, group) * real).square().sum(-1)
    assert bool((err <= plain_err * 1.01 + 1e-6).all())
    assert bool(
        (
            (deq - w).abs()
            <= 0.2 * (high - low).repeat_interleave(group, 1).squeeze(-1)[:, :in_features].view(33, -1)
        ).all()
    )


@pytest.mark.parametrize("in_features,group", [(300, 128), (1024, 128), (520, 256)])
def test_native_int4_fit_agrees_with_pytorchs(in_features, group):
    """The same steps in C: nearly every group gets the same scale, minimum and q; the rest (sums in
    another order can move a least-squares refit by one float16 step) cost no more error overall."""
    from blip2.quantize import int4

    fit = int4.native_fit_kernel()
    if fit is None:
        pytest.skip("no native int4 fit here (no C compiler?)")
    generator = torch.Generator().manual_seed(in_features)
    rows = [
        torch.randn(96, in_features, generator=generator) * 0.02,
        torch.rand(32, in_features, generator=generator) - 0.3,
        torch.distributions.StudentT(2.0).sample((32, in_features)),  # heavy tails: outliers
        torch.full((2, in_features), 0.25),  # constant: scale 0
        torch.zeros(2, in_features),
    ]
    w = torch.cat(rows)
    padded = kernels.padded_width(in_features, group)
    grouped = F.pad(w, (0, padded - in_features)).view(w.shape[0], -1, group)
    want = int4._fit(grouped, (torch.arange(padded) < in_features).view(-1, group))
    got = int4._native_fit(w, padded, group, fit)
    assert got[0].max() <= 15 and got[1].dtype == got[2].dtype == torch.float16
    same = (got[1] == want[1]) & (got[2] == want[2])
    assert same.float().mean() >= 0.97
    assert torch.equal(got[0].view(w.shape[0], -1, group)[same], want[0][same].to(torch.uint8))
    error, wanted = (int4._rounded(grouped, s, m)[1] for s, m in (got[1:], want[1:]))
    assert error.sum() <= wanted.sum() * 1.001
    assert torch.equal(
        got[0].view(w.shape[0], -1, group)[-4:], torch.zeros(4, padded // group, group, dtype=torch.uint8)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_int8_packing_gives_pytorchs_bits(dtype):
    from blip2.quantize import int8

    quantize = int8.native_pack_kernel()
    if quantize is None:
        pytest.skip("no native int8 packing here (no C compiler?)")
    w = (torch.randn(70, 300, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    w[4] = 0.0
    w[9, 7] = 40.0  # an outlier sets its row's scale
    q, scale = quantize_weight(w, 384)
    got = int8._native_pack(w, quantize, chunk=24)  # chunks that end inside a block of 16 rows
    assert torch.equal(got[0], kernels.block_int8(q, 384)) and torch.equal(got[1], scale)
    assert all(torch.equal(a, b) for a, b in zip(int8.pack_int8(w), got, strict=True))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_weight_that_is_not_finite_is_refused_by_name(value, int4_fit):
    from blip2.quantize import int8

    w = torch.randn(20, 256)
    w[7, 100] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        pack_int4(w)
    for pack in (int8.pack_int8, quantize_weight):
        with pytest.raises(ValueError, match="NaN or infinite"):
            pack(w)


def test_quantizing_a_model_names_the_layer_that_is_not_finite(opt_ckpt):
    model = blip2.load(opt_ckpt).model
    with torch.no_grad():
        model.language_model.layers[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"language_model\.layers\.1\.mlp\.fc1: the weight holds NaN"):
        quantize_model_(model, "int4")


def test_pack_int4_rejects_bad_group_sizes():
    for group in (0, 64, 100, -128):
        with pytest.raises(ValueError, match="multiple of 128"):
            pack_int4(torch.randn(4, 256), group)


def _layers(in_features: int, out_features: int, bias: bool, group: int):
    generator = torch.Generator().manual_seed(in_features * 31 + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    return linear, Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, group)


@needs_native
@pytest.mark.parametrize("kind", NATIVE_KINDS or [0])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 70])
# (512, 130): several whole 4 x 4 tiles of 64 outputs and a 1-block edge, split between threads
@pytest.mark.parametrize(
    "in_features,out_features,group", [(40, 3, 128), (256, 33, 128), (300, 17, 256), (512, 130, 256)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_native_matches_pytorch_arithmetic(kind, rows, in_features, out_features, group, bias):
    _, l8, l4 = _layers(in_features, out_features, bias, group)
    x = torch.randn(rows, in_features)
    got8 = kernels.int8_linear(x, l8.qweight, l8.scale, l8.bias, in_features, kind)
    want8 = kernels.int8_reference(x, l8.qweight, l8.scale, l8.bias)
    torch.testing.assert_close(got8, want8, rtol=1e-5, atol=1e-5)
    got4 = kernels.int4_linear(
        x, l4.qweight, l4.scales, l4.mins, l4.bias, in_features, out_features, group, kind
    )
    want4 = kernels.int4_reference(x, l4.qweight, l4.scales, l4.mins, l4.bias, out_features)
    torch.testing.assert_close(got4, want4, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("kind", NATIVE_KINDS or [0])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_row_alone_equals_row_in_batch(kind, threads):
    """Every row count takes the same per-row arithmetic (tiles of 4 or 2 rows, single rows, one block per
    tile below 8 rows and four from 8 on (AVX-512), chunks of 64)."""
    _, l8, l4 = _layers(384, 137, True, 128)
    x = torch.randn(70, 384)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = {
            "int8": lambda x: kernels.int8_linear(x, l8.qweight, l8.scale, l8.bias, 384, kind),
            "int4": lambda x: kernels.int4_linear(
                x, l4.qweight, l4.scales, l4.mins, l4.bias, 384, 137, 128, kind
            ),
        }
        for name, run in runs.items():
            batch = run(x)
            for rows in (1, 3, 5, 7, 8, 66):
                assert torch.equal(run(x[-rows:].clone()), batch[-rows:]), (name, rows)
    finally:
        torch.set_num_threads(previous)


@needs_native
def test_native_refuses_what_the_packing_does_not_allow():
    _, l8, l4 = _layers(256, 8, True, 128)
    kind = NATIVE_KINDS[0]
    with pytest.raises(ValueError, match=r"\(rows, 256\) float32 input"):
        kernels.int8_linear(torch.randn(2, 200), l8.qweight, l8.scale, l8.bias, 256, kind)
    with pytest.raises(ValueError, match=r"\(rows, 256\) float32 input"):
        kernels.int8_linear(torch.randn(256, 2).t(), l8.qweight, l8.scale, l8.bias, 256, kind)
    with pytest.raises(ValueError, match="scales"):
        kernels.int4_linear(
            torch.randn(2, 256), l4.qweight, l4.scales.float(), l4.mins, None, 256, 8, 128, kind
        )
    empty = kernels.int8_linear(torch.randn(0, 256), l8.qweight, l8.scale, None, 256, kind)
    assert empty.shape == (0, 8)


@pytest.mark.parametrize("kernel", ["native", "fbgemm", "dequant"])
def test_int8_linear_close_to_float(kernel):
    if kernel == "fbgemm" and not fbgemm_available():
        pytest.skip("no fbgemm quantized ops in this torch build")
    if kernel == "native" and not NATIVE_KINDS:
        pytest.skip("no native low-bit kernel on this machine")
    torch.manual_seed(0)
    lin = nn.Linear(96, 64)
    q = Int8Linear.from_linear(lin, kernel)
    assert torch.equal(q.int8_weight(), quantize_weight(lin.weight)[0])
    for shape in [(1, 96), (3, 5, 96)]:
        x = torch.randn(*shape)
        ref, out = lin(x), q(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert F.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("kernel", ["native", "dequant"])
def test_int4_linear_close_to_float(kernel):
    if kernel == "native" and not NATIVE_KINDS:
        pytest.skip("no native low-bit kernel on this machine")
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    q = Int4Linear.from_linear(lin, 128, kernel)
    for shape in [(1, 256), (3, 5, 256)]:
        x = torch.randn(*shape)
        ref, out = lin(x), q(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert F.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
    x = torch.randn(4, 256)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantized(), q.bias), rtol=0.05, atol=0.05)


def _inputs(m, n=2):
    return m.processor(images=make_images(n), text=["a photo of", "Question: what is it? Answer:"][:n])


# int4 rounded at load on the random test checkpoints: OPT 0.976-0.981 (per position >= 0.93), T5 0.978-0.983
# (>= 0.96) with its encoder int8 (0.94-0.97 when it was int4). Calibrated int4 (GPTQ) is held to the
# issue's 0.98 in test_gptq.py; the trained demo model's scores in test_quantize_demo.py.
@pytest.mark.parametrize(
    "lm,method,bound,position_bound",
    [
        ("opt", "int8", 0.99, 0.98),
        ("t5", "int8", 0.99, 0.98),
        ("opt", "int4", 0.97, 0.9),  # the sharpened test OPT (factory.sharpen_opt)
        ("t5", "int4", 0.97, 0.94),
    ],
)
def test_logits_close_to_float32(lm, method, bound, position_bound, opt_ckpt, t5_ckpt):
    path = opt_ckpt if lm == "opt" else t5_ckpt
    ref = blip2.load(path)
    m = blip2.load(path, quantize=method)
    for part in (m.model.vision, m.model.qformer, m.model.language_model):
        kinds = {type(mod) for mod in part.modules()}
        want = Int4Linear if method == "int4" and part is not m.model.qformer else Int8Linear
        assert want in kinds and Linear not in kinds and nn.Linear not in kinds
    assert type(m.model.projection) is Linear  # the projection stays float32
    enc = _inputs(ref)
    kwargs = {}
    if lm == "t5":
        kwargs["decoder_input_ids"] = torch.tensor([[0, 5, 9, 3], [0, 7, 2, 4]])
    with torch.inference_mode():
        a = ref.model(**enc, **kwargs).logits
        b = m.model(**enc, **kwargs).logits
    cos = F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)
    assert bool((cos >= bound).all()), cos
    per_pos = F.cosine_similarity(a, b, dim=-1)  # every next-token distribution stays close
    assert per_pos.min() >= position_bound, per_pos.min()


def test_plan_and_counts(opt_ckpt):
    m = blip2.load(opt_ckpt)
    parts = (m.model.vision, m.model.qformer, m.model.language_model)
    n_linear = sum(type(mod) is Linear for part in parts for mod in part.modules())
    layers = plan(m.model, "int4")
    assert len(layers) == n_linear
    by_part = {}
    for name, bits in layers.items():
        by_part.setdefault(name.split(".")[0], set()).add(bits)
    assert by_part == {"vision": {"int4"}, "qformer": {"int8"}, "language_model": {"int4"}}
    assert set(plan(m.model, "int8").values()) == {"int8"}
    assert quantize_model_(m.model, "int4") == n_linear


def test_t5_encoder_stays_int8_under_int4(t5_ckpt):
    """T5's encoder runs once per prompt (no decode step reads it) and held half of int4's logit error on
    the T5 test checkpoints: it is int8 under int4, its decoder int4."""
    m = blip2.load(t5_ckpt, quantize="int4")
    lm = m.model.language_model
    encoder = {type(mod) for mod in lm.encoder.modules()} & {Int4Linear, Int8Linear}
    decoder = {type(mod) for mod in lm.decoder.modules()} & {Int4Linear, Int8Linear}
    assert (encoder, decoder) == ({Int8Linear}, {Int4Linear})
    assert isinstance(lm.lm_head, Int4Linear)


def test_load_rejects_bad_combinations(opt_ckpt, tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        blip2.load(opt_ckpt, quantize="int3")
    with pytest.raises(ValueError, match="exact"):
        blip2.load(opt_ckpt, quantize="int4", exact=True)
    with pytest.raises(ValueError, match="group_size"):
        blip2.load(opt_ckpt, quantize="int8", group_size=128)
    with pytest.raises(ValueError, match="multiple of 128"):
        blip2.load(opt_ckpt, quantize="int4", group_size=100)
    with pytest.raises(ValueError, match="^int4 group size must be"):  # before reading the checkpoint
        blip2.load(tmp_path / "missing", quantize="int4", group_size=100)


PROMPTS = [
    "a photo of",
    "Question: how many dogs are there? Answer:",
    "",
    "the red",
    "a",
    "Question: where is the cat? Answer:",
    "There are two green cubes and a",
    "the",
]


def _logits_along(m, image, prompt: str, ids: list[int], lm: str) -> torch.Tensor:
    """(len(ids), V) next-token logits at each step of the given continuation (teacher forcing)."""
    enc = m.processor(images=[image], text=[prompt])
    with torch.inference_mode():
        if lm == "t5":
            start = m.model.cfg.text.decoder_start_token_id
            return m.model(**enc, decoder_input_ids=torch.tensor([[start, *ids]])).logits[0, : len(ids)]
        k = enc["input_ids"].shape[1]
        full = torch.cat([enc["input_ids"], torch.tensor([ids], dtype=torch.long)], dim=1)
        out = m.model(**dict(enc, input_ids=full, attention_mask=torch.ones_like(full))).logits
    return out[0, k - 1 : k - 1 + len(ids)]


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_int8_generation_agrees_with_float32(lm, opt_ckpt, t5_ckpt):
    """int8 greedy texts held to float32's on 8 images x 8 prompts.

    Random test weights give next-token distributions full of near ties (the median gap between the
    two best logits is ~0.3 logit std), so int8's rounding flips some of them and the texts part from
    there. Measured on these checkpoints: texts identical 44/64 (OPT) and 34/64 (T5); along float32's
    text int8 picks the same token at 95% / 92% of steps, with logit cosine >= 0.992; every text parts
    at a step where float32's two best logits are within 0.24 std. The thresholds below leave room for
    other CPUs' rounding, and still fail for any real fault (chance agreement is ~1/400 a token).
    """
    path = opt_ckpt if lm == "opt" else t5_ckpt
    ref, m = blip2.load(path), blip2.load(path, quantize="int8")
    images = make_images(8, 28, seed=21)
    same_texts = steps = same_steps = 0
    for prompt in PROMPTS:
        want = ref.generate_ids(images, prompt, max_new_tokens=8)
        got = m.generate_ids(images, prompt, max_new_tokens=8)
        for image, a, b in zip(images, want, got, strict=True):
            la = _logits_along(ref, image, prompt, a, lm)
            lb = _logits_along(m, image, prompt, a, lm)
            assert la.argmax(-1).tolist() == a  # the forward pass is the float32 generation's
            cos = F.cosine_similarity(la, lb, dim=-1)
            assert cos.min() >= 0.98 and cos.mean() >= 0.99, (prompt, cos)
            steps += len(a)
            same_steps += int((la.argmax(-1) == lb.argmax(-1)).sum())
            same_texts += a == b
            if a != b:  # int8 parts from float32 only where float32 was all but tied
                j = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
                top = la[j].topk(2).values
                assert top[0] - top[1] < 0.4 * la[j].std(), (prompt, j, top)
    n = len(PROMPTS) * len(images)
    assert same_texts >= 0.4 * n, f"int8 texts equal float32's for {same_texts}/{n}"
    assert same_steps >= 0.85 * steps, f"int8 picks float32's token at {same_steps}/{steps} steps"


def test_int4_group_size_reaches_the_layers(opt_ckpt):
    m = blip2.load(opt_ckpt, quantize="int4", group_size=256)
    assert {mod.group_size for mod in m.model.modules() if isinstance(mod, Int4Linear)} == {256}


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_generation_runs_and_batched_equals_alone(method, opt_ckpt):
    m = blip2.load(opt_ckpt, quantize=method)
    images = make_images(3)
    batched = m.caption(images, max_new_tokens=6)
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    m.prefix_cache.clear()
    m.prefill_cache.clear()
    assert [m.caption([image], max_new_tokens=6)[0] for image in images] == batched


@needs_native
def test_native_description_follows_replaced_tensors():
    """The kernel is handed pointers made once per layer: a replaced or moved tensor must renew them."""
    _, l8, l4 = _layers(256, 24, True, 128)
    x = torch.randn(3, 256)
    references = {
        l8: lambda: kernels.int8_reference(x, l8.qweight, l8.scale, l8.bias),
        l4: lambda: kernels.int4_reference(x, l4.qweight, l4.scales, l4.mins, l4.bias, 24),
    }
    for layer, reference in references.items():
        layer(x)  # describes the layer
        layer.bias = layer.bias + 1.0
        torch.testing.assert_close(layer(x), reference(), rtol=1e-5, atol=1e-5)
        layer.half()  # _apply: packed tensors keep their dtypes, the description is renewed
        assert layer.__dict__.get("_native") is None and layer.bias.dtype == torch.float32
        torch.testing.assert_close(layer(x), reference(), rtol=1e-5, atol=1e-5)
