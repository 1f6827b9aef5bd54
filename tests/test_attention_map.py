"""Heat maps of where the model looked (blip2.attention_map): the kept cross-attention weights against the
reference's, Grad-CAM against the same computation on the reference, the maps' form, and what they show
on the demo model, whose scenes put known objects at known places."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blip2
from blip2.attention_map import attention_map, heat_layer, overlay, question_prompt
from blip2.demo import scenes
from blip2.errors import InputError
from factory import load_reference, make_images


def reference_cross_attention(ref) -> tuple[list[torch.Tensor], list]:
    """Hooks that collect the reference Q-Former's cross-attention weights (eager attention returns them)."""
    ref.set_attn_implementation("eager")
    kept: list[torch.Tensor] = []
    handles = [
        layer.crossattention.attention.register_forward_hook(lambda m, args, out: kept.append(out[1]))
        for layer in ref.qformer.encoder.layer
        if layer.has_cross_attention
    ]
    return kept, handles


def test_kept_weights_equal_the_reference_and_change_nothing(opt_ckpt):
    pipe = blip2.load(opt_ckpt)
    ref, proc = load_reference(opt_ckpt)
    images = make_images(2, seed=3)
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    kept_ref, handles = reference_cross_attention(ref)
    with torch.no_grad():
        ref.get_image_features(pixel_values=pixels)
    for h in handles:
        h.remove()
    with torch.no_grad():
        plain = pipe.model.image_features(pixels)
        with pipe.model.qformer.keep_cross_attention() as kept:
            recorded = pipe.model.image_features(pixels)
    layers = pipe.config.qformer.num_layers // pipe.config.qformer.cross_attention_every
    assert len(kept) == len(kept_ref) == layers
    for ours, theirs in zip(kept, kept_ref, strict=True):
        assert ours.shape == theirs.shape  # (B, H, Q, N)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(recorded.qformer, plain.qformer, atol=1e-5, rtol=1e-4)
    # outside the block nothing is kept
    pipe.model.image_features(pixels)
    assert len(kept) == layers
    assert all(
        layer.cross_attn is None or layer.cross_attn.kept is None for layer in pipe.model.qformer.layers
    )


def test_itm_gradcam_equals_the_reference(itm_ckpt):
    """Grad-CAM of the ITM logit, computed again on the reference model with its own autograd."""
    pipe = blip2.load(itm_ckpt)
    ref, proc = load_reference(itm_ckpt)
    image, text = make_images(1, seed=5)[0], "a red ball on the table"
    ours = attention_map(pipe, image, text)
    assert ours.method == "gradcam"

    kept, handles = reference_cross_attention(ref)
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    logits = ref(**inputs, use_image_text_matching_head=True).logits_per_image  # (1, 2)
    grads = torch.autograd.grad(logits[0, 1], kept)
    for h in handles:
        h.remove()
    cam = torch.stack([w.detach() * g.clamp(min=0) for w, g in zip(kept, grads, strict=True)])
    patches = cam[..., 1:].mean(dim=(0, 2, 3))[0]
    side = int(patches.numel() ** 0.5)
    expected = (patches / patches.sum()).reshape(side, side).numpy()
    np.testing.assert_allclose(ours.grid, expected, atol=1e-5)


@pytest.mark.parametrize("ckpt", ["opt_ckpt", "t5_ckpt", "itm_ckpt"])
def test_maps_form_and_dependence(ckpt, request):
    pipe = blip2.load(request.getfixturevalue(ckpt))
    a, b = make_images(2, seed=7)
    grid = pipe.config.vision.image_size // pipe.config.vision.patch_size
    texts = ("a red ball on the table", "two dogs in the grass")
    for method in ("attention", "gradcam"):
        first = attention_map(pipe, a, texts[0], prompt="a photo of", method=method)
        assert first.method == method
        assert first.grid.shape == (grid, grid) and first.grid.dtype == np.float32
        assert (first.grid >= 0).all() and first.grid.sum() == pytest.approx(1, abs=1e-5)
        other_image = attention_map(pipe, b, texts[0], prompt="a photo of", method=method)
        assert not np.allclose(first.grid, other_image.grid, atol=1e-4)
        other_text = attention_map(pipe, a, texts[1], prompt="a photo of", method=method)
        if method == "gradcam":
            assert not np.allclose(first.grid, other_text.grid, atol=1e-4)
        else:  # the queries never see the text
            np.testing.assert_array_equal(first.grid, other_text.grid)
    expected = "gradcam" if pipe.config.retrieval else "attention"
    assert attention_map(pipe, a, texts[0]).method == expected
    with pytest.raises(InputError, match="needs the text"):
        attention_map(pipe, a, method="gradcam")
    with pytest.raises(InputError, match="method must be"):
        attention_map(pipe, a, method="saliency")


def test_drawing():
    grid = np.zeros((4, 4), np.float32)
    grid[0, 3] = 1.0  # all the mass in the top-right patch
    layer = heat_layer(grid, (64, 48))
    assert layer.mode == "RGBA" and layer.size == (64, 48)
    alpha = np.asarray(layer)[..., 3]
    assert alpha[2, 60] > 100 and alpha[45, 3] == 0  # opaque over the hot patch, clear far from it
    image = Image.new("RGB", (64, 48), (255, 255, 255))
    drawn = np.asarray(overlay(image, grid)).astype(int)
    assert drawn.shape == (48, 64, 3)
    assert (drawn[45, 3] == 255).all() and drawn[2, 60, 2] < 200  # untouched far away, coloured at the peak


# ---- what the maps show on the demo model --------------------------------------------------------------


def coverage(scene: scenes.Scene, obj: scenes.Obj, grid: int) -> np.ndarray:
    """(grid, grid): the share of each patch that ``obj`` covers."""
    alone = scenes.Scene((obj,), (scene.jitter[scene.objects.index(obj)],), ((0, 0, 0),))
    inside = alone.label_map(scenes.IMAGE_SIZE) > 0
    p = scenes.IMAGE_SIZE // grid
    return inside.reshape(grid, p, grid, p).mean(axis=(1, 3))


def mass_on(grid: np.ndarray, cover: np.ndarray) -> float:
    """The map's mean over an object's patches (weighted by cover), relative to a uniform map's (1)."""
    return float((grid * cover).sum() / cover.sum() * grid.size)


@pytest.fixture(scope="module")
def demo_scenes():
    return scenes.generate(2024, 60, "train")


def test_demo_attention_falls_on_the_object(demo_scenes):
    """One object in the picture: the queries read its patches more than the average patch."""
    pipe = blip2.load("demo")
    ratios = []
    for scene in demo_scenes:
        if len(scene.objects) == 1:
            grid = attention_map(pipe, scene.render()).grid
            ratios.append(mass_on(grid, coverage(scene, scene.objects[0], grid.shape[0])))
    assert len(ratios) >= 10
    assert np.mean(np.array(ratios) > 1) >= 0.9 and np.mean(ratios) > 1.3


def test_demo_itm_gradcam_picks_the_named_object(demo_scenes):
    """Several objects: the ITM Grad-CAM of one object's phrase lies more on it than on the others."""
    pipe = blip2.load("demo-itm")
    wins = []
    for scene in demo_scenes[:30]:
        if len(scene.objects) < 2:
            continue
        image = scene.render()
        for obj in scene.objects:
            grid = attention_map(pipe, image, obj.phrase).grid
            others = sum(coverage(scene, o, grid.shape[0]) for o in scene.objects if o is not obj)
            wins.append(mass_on(grid, coverage(scene, obj, grid.shape[0])) > mass_on(grid, others))
    assert len(wins) >= 40
    assert np.mean(wins) >= 0.7  # 0.81-0.91 on five seeds; a map blind to the text would score ~0.5


def test_question_prompt_is_asks(opt_ckpt, tmp_path_factory):
    from factory_instruct import build_instruct_checkpoint

    assert (
        question_prompt(blip2.load(opt_ckpt), " what colour is it? ")
        == "Question: what colour is it? Answer:"
    )
    instruct = blip2.load(build_instruct_checkpoint(tmp_path_factory.mktemp("ib"), lm="t5", seed=2))
    assert question_prompt(instruct, " what colour is it? ") == "what colour is it?"


def test_caption_heatmap_command(tmp_path, capsys):
    """``blip2 caption IMAGE --heatmap out.png``: the caption as usual, and the map drawn over the image."""
    from blip2.cli import main

    image = Path(__file__).resolve().parent.parent / "examples" / "scene1.png"
    out = tmp_path / "looked.png"
    assert main(["caption", str(image), "--model", "demo", "--heatmap", str(out)]) == 0
    pipe = blip2.load("demo")
    captured = capsys.readouterr()
    assert captured.out.strip() == pipe.caption(image)[0].strip()
    assert "looked.png: where it looked (attention)" in captured.err
    expected = overlay(image, attention_map(pipe, image).grid, min_side=256)
    with Image.open(out) as drawn:
        assert drawn.format == "PNG" and drawn.size == (256, 256)
        np.testing.assert_array_equal(np.asarray(drawn.convert("RGB")), np.asarray(expected))

    out = tmp_path / "cam.png"
    assert (
        main(["caption", str(image), "--model", "demo", "--heatmap", str(out), "--heatmap-method", "gradcam"])
        == 0
    )
    assert "(gradcam)" in capsys.readouterr().err
    with Image.open(out) as drawn:
        assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(expected))

    assert main(["caption", str(image), str(image), "--model", "demo", "--heatmap", str(out)]) == 1
    assert "--heatmap draws one image's map" in capsys.readouterr().err


def test_int8_model_falls_back_to_attention():
    """int8 layers have no backward: auto gives the attention map, an explicit Grad-CAM a clear error."""
    pipe = blip2.load("demo-itm", quantize="int8")
    image = Path(__file__).resolve().parent.parent / "examples" / "scene1.png"
    found = attention_map(pipe, image, "a small red triangle")
    assert found.method == "attention" and found.grid.sum() == pytest.approx(1, abs=1e-5)
    with pytest.raises(InputError, match="Grad-CAM needs gradients"):
        attention_map(pipe, image, "a small red triangle", method="gradcam")
