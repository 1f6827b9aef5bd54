"""int4 fitted by GPTQ to calibration inputs (`blip2.quantize.gptq`, `calibrate`, `blip2 quantize
--calibration`): the layer arithmetic, the passes over a model, and the issue's quality target -- logit
cosine >= 0.98 to float32 on the random test checkpoints -- on held-out images."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import blip2
from blip2.cli import main
from blip2.errors import ImageError, InputError
from blip2.quantize import Int4Linear, Int8Linear
from blip2.quantize.calibrate import image_files, quantize_calibrated, save_calibrated
from blip2.quantize.gptq import gptq_int4, hessian_passes, probe, static_groups
from blip2.quantize.model import plan
from factory import build_checkpoint, make_images

PROMPTS = ["a photo of", "Question: what is it? Answer:"]
T5_DECODER_INPUT = torch.tensor([[0, 5, 9, 3], [0, 7, 2, 4]])


def _correlated_inputs(n: int, width: int, seed: int) -> torch.Tensor:
    """Rows whose columns are strongly correlated and of unequal energy, as a layer's inputs are."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=torch.Generator().manual_seed(99)) / width**0.5
    mixing += torch.eye(width) * 0.3
    scale = torch.logspace(0, -1.5, width)
    return (torch.randn(n, width, generator=g) @ mixing) * scale


@pytest.mark.parametrize(
    "in_features,group", [(256, 128), (200, 128), (640, 256)]
)  # 200, 640: the last group is part padding
def test_gptq_output_error_is_well_below_rounding(in_features, group):
    w = torch.randn(64, in_features, generator=torch.Generator().manual_seed(1)) * 0.05
    x = _correlated_inputs(2048, in_features, seed=2)
    held_out = _correlated_inputs(1024, in_features, seed=3)
    codes = gptq_int4(w, x.T @ x, group_size=group)
    rounded = static_groups(w, group)
    assert codes.q.dtype == torch.uint8 and int(codes.q.max()) <= 15
    assert torch.equal(codes.scales, rounded.scales) and torch.equal(codes.mins, rounded.mins)
    assert not codes.q[:, in_features:].any()  # padding codes stay zero

    def output_error(c):
        return (held_out @ (c.dequantized(in_features) - w).T).square().mean()

    assert output_error(codes) < 0.6 * output_error(rounded), (output_error(codes), output_error(rounded))
    # the weights themselves move further: GPTQ trades weight error for output error
    assert (codes.dequantized(in_features) - w).square().mean() > (
        rounded.dequantized(in_features) - w
    ).square().mean()


def test_codes_become_an_int4_layer_that_computes_them():
    w = torch.randn(40, 200, generator=torch.Generator().manual_seed(4))
    x = _correlated_inputs(512, 200, seed=5)
    codes = gptq_int4(w, x.T @ x, group_size=128)
    bias = torch.randn(40)
    layer = Int4Linear.from_codes(codes.q, codes.scales, codes.mins, bias, 200, 128)
    assert torch.equal(layer.dequantized(), codes.dequantized(200))
    with torch.inference_mode():
        got = layer(x[:8])
    want = F.linear(x[:8], codes.dequantized(200), bias)
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    with pytest.raises(ValueError, match="do not fit"):
        Int4Linear.from_codes(codes.q, codes.scales, codes.mins, bias, 300, 128)


def test_dead_inputs_and_a_rank_deficient_covariance_still_give_codes():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(6))
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(7))  # 8 rows: rank 8 of 128
    x[:, :10] = 0  # inputs that are always zero
    codes = gptq_int4(w, x.T @ x, group_size=128)
    assert torch.isfinite(codes.dequantized(128)).all()
    assert torch.equal(codes.q[:, :10], static_groups(w, 128).q[:, :10])  # dead columns: nearest code
    with pytest.raises(ValueError, match="NaN"):
        gptq_int4(w, torch.full((128, 128), float("nan")), group_size=128)
    with pytest.raises(ValueError, match="hessian"):
        gptq_int4(w, torch.eye(64), group_size=128)


def test_passes_share_an_input_and_respect_the_budget(opt_ckpt):
    pipe = blip2.load(opt_ckpt)
    model = pipe.model
    enc = pipe.processor(images=make_images(2), text=PROMPTS)
    runs = [lambda: model(**enc)]
    names = [
        n for n, bits in plan(model, "int4").items() if bits == "int4" and n.startswith("language_model")
    ]
    order, owner = probe(model, names[::-1], runs[0])
    assert order == names  # the forward's order, whatever the order asked in
    attn = "language_model.layers.0.attn"
    assert owner[f"{attn}.q"] == owner[f"{attn}.k"] == owner[f"{attn}.v"] == f"{attn}.q"
    assert (
        owner[f"{attn}.out"] == f"{attn}.out" and owner["language_model.lm_head"] == "language_model.lm_head"
    )

    inputs: dict[str, torch.Tensor] = {}

    def record(name, x):
        inputs[name] = x.reshape(-1, x.shape[-1])

    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _, a, n=n: record(n, a[0])) for n in names
    ]
    with torch.inference_mode():
        model(**enc)
    for hook in hooks:
        hook.remove()
    seen: list[str] = []

    def check(name, hessian):
        seen.append(name)
        torch.testing.assert_close(hessian.xtx, inputs[name].T @ inputs[name], rtol=1e-4, atol=1e-4)

    for budget in (1, 1 << 30):  # one layer a pass, or all in one
        seen.clear()
        with torch.inference_mode():
            hessian_passes(model, names[::-1], runs, budget, check)
        assert seen == names


def _cosines(path, lm, model):
    """Cosine of ``model``'s logits to the float32 model's on held-out images, per sample."""
    ref = blip2.load(path)
    enc = ref.processor(images=make_images(2), text=PROMPTS)
    kwargs = {"decoder_input_ids": T5_DECODER_INPUT} if lm == "t5" else {}
    with torch.inference_mode():
        a, b = ref.model(**enc, **kwargs).logits, model(**enc, **kwargs).logits
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)


@pytest.mark.parametrize("lm", ["opt", "t5"])
@pytest.mark.parametrize("seed", [0, 1])
def test_calibrated_int4_is_within_the_issues_bound(lm, seed, tmp_path):
    """The issue's int4 target, logit cosine >= 0.98 to float32, on the random test checkpoints: met with
    calibration (images other than the held-out ones, the same kind of prompts), above plain rounding;
    the saved checkpoint maps the same layers back."""
    path = build_checkpoint(tmp_path / "src", lm=lm, seed=seed)
    pipe = blip2.load(path)
    calibration = make_images(32, seed=1000 + seed)
    note = quantize_calibrated(pipe, calibration, prompts=PROMPTS, progress=False)
    assert note["method"] == "gptq" and note["images"] == 32
    calibrated = _cosines(path, lm, pipe.model)
    rounded = _cosines(path, lm, blip2.load(path, quantize="int4").model)
    assert bool((calibrated >= 0.98).all()), calibrated
    assert calibrated.mean() > rounded.mean(), (calibrated, rounded)

    out = save_calibrated(pipe, tmp_path / "int4", note)
    entry = json.loads((out / "config.json").read_text())["quantization"]
    assert entry["method"] == "int4" and entry["calibration"]["method"] == "gptq"
    saved = blip2.load(out)
    assert torch.equal(_cosines(path, lm, saved.model), calibrated)
    layers = dict(saved.model.named_modules())
    assert {
        type(layers[n]) for n, bits in plan(blip2.load(path).model, "int4").items() if bits == "int4"
    } == {Int4Linear}
    assert isinstance(saved.model.qformer.layers[0].self_attn.q, Int8Linear)
    # the calibrated pipeline runs quantized, not on what the float model cached for its images
    assert saved.generate(calibration[:3], PROMPTS[0], max_new_tokens=6) == pipe.generate(
        calibration[:3], PROMPTS[0], max_new_tokens=6
    )


def test_quantize_cli_calibrates(opt_ckpt, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for i, image in enumerate(make_images(6, seed=40)):
        image.save(folder / ("more" if i % 2 else ".") / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    make_images(1, seed=41)[0].save(folder / ".hidden.png")  # left out, as `blip2 index` leaves it
    assert [p.name for p in image_files([folder], 4)] == ["0.png", "2.png", "4.png", "1.png"]
    dst = tmp_path / "q4"
    args = ["quantize", str(opt_ckpt), str(dst), "--bits", "4", "--calibration", str(folder),
            "--calibration-count", "5", "--calibration-prompt", "a photo of"]  # fmt: skip
    assert main(args) == 0
    assert "int4 checkpoint" in capsys.readouterr().err
    note = json.loads((dst / "config.json").read_text())["quantization"]["calibration"]
    assert (note["images"], note["prompts"]) == (5, ["a photo of"])
    assert isinstance(blip2.load(dst).model.language_model.lm_head, Int4Linear)

    assert (
        main(["quantize", str(opt_ckpt), str(tmp_path / "q8"), "--bits", "8", "--calibration", str(folder)])
        == 1
    )
    assert "--bits 4" in capsys.readouterr().err
    assert (
        main(
            [
                "quantize",
                str(opt_ckpt),
                str(tmp_path / "x"),
                "--bits",
                "4",
                "--calibration",
                str(tmp_path / "no"),
            ]
        )
        == 1
    )
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_calibration_input_is_named(opt_ckpt, tmp_path):
    pipe = blip2.load(opt_ckpt)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match="broken.png"):
        quantize_calibrated(pipe, [broken])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no image files"):
        quantize_calibrated(pipe, [empty])
    with pytest.raises(InputError, match="prompts"):
        quantize_calibrated(pipe, make_images(2), prompts=[])
    quantized = blip2.load(opt_ckpt, quantize="int8")
    with pytest.raises(InputError, match="already quantized"):
        quantize_calibrated(quantized, make_images(2))


def test_a_retrieval_checkpoint_calibrates_its_image_side(itm_ckpt, tmp_path):
    pipe = blip2.load(itm_ckpt)
    images = make_images(2, seed=8)
    with torch.inference_mode():
        want = pipe.model.image_features(pipe.processor.image_processor(images)).qformer
    quantize_calibrated(pipe, make_images(8, seed=9), progress=False)
    assert isinstance(pipe.model.vision.blocks[0].mlp.fc1, Int4Linear)
    with torch.inference_mode():
        got = pipe.model.image_features(pipe.processor.image_processor(images)).qformer
    assert F.cosine_similarity(want.flatten(), got.flatten(), dim=0) > 0.98


@pytest.mark.parametrize("kind", ["instruct_llama_ckpt", "instruct_t5_ckpt"])
def test_instructblip_calibrates(kind, request, tmp_path):
    """InstructBLIP (a LLaMA with grouped key/value heads, a Flan-T5): the instruction reaches the Q-Former
    in calibration too, and the calibrated model is closer to float32 than plain rounding."""
    path = request.getfixturevalue(kind)
    lm = "t5" if "t5" in kind else "llama"
    pipe = blip2.load(path)
    quantize_calibrated(pipe, make_images(16, seed=50), prompts=PROMPTS, progress=False)
    calibrated = _cosines(path, lm, pipe.model)
    rounded = _cosines(path, lm, blip2.load(path, quantize="int4").model)
    assert calibrated.mean() > rounded.mean(), (calibrated, rounded)
    out = save_calibrated(pipe, tmp_path / "int4", {"method": "gptq"})
    assert blip2.load(out).ask(make_images(1)[0], "what is it?", max_new_tokens=3) is not None


def test_a_weight_that_cannot_be_quantized_is_named(opt_ckpt):
    pipe = blip2.load(opt_ckpt)
    fc1 = pipe.model.language_model.layers[1].mlp.fc1
    fc1.weight = torch.nn.Parameter(fc1.weight.detach().clone(), requires_grad=False)
    fc1.weight[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"language_model\.layers\.1\.mlp\.fc1: .*(NaN|infinit)"):
        quantize_calibrated(pipe, make_images(4), progress=False)


@pytest.mark.parametrize("n", [100, 700])  # below and above the halving's base
def test_the_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse(n):
    from blip2.quantize.gptq import _inverse_cholesky

    x = _correlated_inputs(2 * n, n, seed=11)
    h = x.T @ x
    upper = _inverse_cholesky(h, damp=0.01)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(n)
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    want = torch.linalg.cholesky(torch.linalg.inv(damped.double()), upper=True)
    torch.testing.assert_close(upper.double(), want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
