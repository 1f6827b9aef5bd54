"""Processor parity with the reference: pixels, token ids, padding, decoding; and the error cases."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2.errors import ImageError, InputError
from blip2.images import load_image, load_images
from blip2.processor import ImageProcessor, Processor, TextTokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoProcessor  # noqa: E402
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # noqa: E402

transformers.logging.set_verbosity_error()

TEXTS = [
    "a photo of",
    "Question: how many cats are there? Answer:",
    "  the red   cube , on the table !  isn't it's   ",
    "",
    "<image> and </s> <pad> [SEP] inline",
    "Ünïcode café 中文 😀\ttabs\nnew line",
]


def _reference(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoProcessor.from_pretrained(str(path))


@pytest.fixture(scope="module", params=["opt", "t5", "itm"])
def pair(request):
    """(our processor, the reference's) for each shared checkpoint."""
    path = request.getfixturevalue(f"{request.param}_ckpt")
    return Processor.from_pretrained(path), _reference(path)


def _picture(height: int = 23, width: int = 37, seed: int = 0) -> Image.Image:
    """A smooth gradient plus noise, so that resampling filters actually differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    noisy = base + rng.normal(0, 25, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _in_mode(mode: str) -> Image.Image:
    rgb = _picture()
    if mode == "RGBA":
        image = rgb.copy()
        image.putalpha(Image.linear_gradient("L").resize(rgb.size))
        return image
    if mode == "LA":
        image = rgb.convert("LA")
        image.putalpha(Image.linear_gradient("L").rotate(90).resize(rgb.size))
        return image
    if mode == "P":
        return rgb.quantize(16)
    if mode == "P+transparency":
        image = rgb.quantize(16)
        image.info["transparency"] = 3
        return image
    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 200).astype(np.uint16))
    return rgb.convert(mode)


def _ref_pixels(ref_image_processor, images) -> torch.Tensor:
    return ref_image_processor(images, return_tensors="pt")["pixel_values"]


# ============================================================================ pixels

MODES = ["RGB", "L", "RGBA", "P", "P+transparency", "CMYK", "LA", "I;16", "I", "1"]
CONFIGS = [
    {"size": {"height": 20, "width": 36}},
    {"size": {"height": 31, "width": 17}, "resample": 2},
    {
        "size": {"height": 16, "width": 16},
        "resample": 0,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
    {"size": {"height": 40, "width": 24}, "resample": 1, "rescale_factor": 0.5 / 255},
    {"size": {"height": 12, "width": 30}, "do_normalize": False},
    {"size": {"height": 12, "width": 30}, "do_rescale": False},
    {"size": {"height": 23, "width": 37}, "do_resize": False},
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_pixels_pil_images(mode, config):
    image = _in_mode(mode)
    ours = ImageProcessor.from_dict(config)([image, image.copy()])
    ref = _ref_pixels(BlipImageProcessorPil(**config), [image, image.copy()])
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [{"shortest_edge": 18}, {"shortest_edge": 18, "longest_edge": 24}, 26])
def test_pixels_other_size_forms(size):
    image = _picture(23, 41)
    ours = ImageProcessor.from_dict({"size": size})(image)
    ref = _ref_pixels(BlipImageProcessorPil(size=size), image)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_pixels_from_checkpoint(pair):
    ours, ref = pair
    images = [_in_mode(m) for m in ("RGB", "RGBA", "L")]
    torch.testing.assert_close(
        ours(images=images)["pixel_values"], _ref_pixels(ref.image_processor, images), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P+transparency", "PNG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
    ],
)
def test_pixels_from_path_and_bytes(tmp_path, mode, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    extra = {}
    if mode == "RGB+key":  # an RGB PNG with a colour key (tRNS chunk)
        image = _in_mode("RGB").quantize(8).convert("RGB")
        extra["transparency"] = image.getpixel((0, 0))
    else:
        image = _in_mode(mode)
        extra = {"transparency": 3} if mode == "P+transparency" else {}
    image.save(path, format=fmt, **extra)
    processor = ImageProcessor(size=(19, 27))
    ref = _ref_pixels(BlipImageProcessorPil(size={"height": 19, "width": 27}), str(path))
    for source in (path, str(path), path.read_bytes()):
        torch.testing.assert_close(processor(source), ref, atol=1e-5, rtol=0)


def test_exif_orientation_from_path(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    _picture(20, 30).save(path, exif=exif)
    assert load_image(path).size == (20, 30)
    ref = _ref_pixels(BlipImageProcessorPil(size={"height": 14, "width": 22}), str(path))
    torch.testing.assert_close(ImageProcessor(size=(14, 22))(path), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a,  # H×W×3 uint8
        lambda a: np.ascontiguousarray(a.transpose(2, 0, 1)),  # 3×H×W
        lambda a: np.concatenate(
            [a, (np.arange(a.shape[1]) * 6 % 256).astype(np.uint8)[None, :, None].repeat(a.shape[0], 0)], -1
        ),
        lambda a: a[:, :, :1],  # H×W×1
        lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))),
        lambda a: torch.from_numpy(a),
    ],
    ids=["hwc3", "chw3", "hwc4", "hwc1", "tensor-chw", "tensor-hwc"],
)
def test_pixels_from_arrays(make):
    array = make(np.array(_picture()))
    config = {"size": {"height": 21, "width": 15}}
    ours = ImageProcessor.from_dict(config)(array)
    ref = _ref_pixels(BlipImageProcessorPil(**config), array)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_grayscale_and_float_arrays_read_like_uint8():
    gray = np.asarray(_picture().convert("L"))
    assert np.array_equal(np.asarray(load_image(gray)), np.asarray(Image.fromarray(gray).convert("RGB")))
    rgb = np.asarray(_picture())
    for floats in (rgb / 255.0, (rgb / 255.0).astype(np.float32), torch.from_numpy(rgb / 255.0)):
        assert np.array_equal(np.asarray(load_image(floats)), rgb)
    batch = np.stack([rgb, rgb])
    assert len(load_images(batch)) == 2 and len(load_images(rgb)) == 1


# ============================================================================ text


def test_token_ids_and_special_ids(pair):
    ours, ref = pair
    tok = ours.tokenizer
    for text in TEXTS:
        assert tok.encode(text) == [ref.tokenizer(text)["input_ids"]], text
        assert tok.encode(text, add_special_tokens=False) == [
            ref.tokenizer(text, add_special_tokens=False)["input_ids"]
        ]
    assert tok.vocab_size == len(ref.tokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ref.tokenizer.bos_token_id,
        ref.tokenizer.eos_token_id,
        ref.tokenizer.pad_token_id,
    )
    assert tok.image_token_id == ref.tokenizer.convert_tokens_to_ids("<image>")
    assert tok.padding_side == ref.tokenizer.padding_side


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"padding_side": "left"},
        {"padding_side": "right"},
        {"max_length": 9},
        {"max_length": 30, "padding": "max_length"},
    ],
)
def test_processor_output_equals_reference(pair, kwargs):
    ours, ref = pair
    if "max_length" in kwargs and ours.num_query_tokens is None:
        pytest.skip("the reference crashes on max_length without num_query_tokens")
    images = [_picture(seed=1), _in_mode("RGBA")]
    texts = ["a photo of a cat sitting on the table next to a red ball", "hi"]
    ref_kwargs = {
        "padding": kwargs.get("padding", True),
        **{k: v for k, v in kwargs.items() if k != "padding"},
    }
    if "max_length" in kwargs:
        ref_kwargs["truncation"] = True
    for with_images in (True, False):
        got = ours(images=images if with_images else None, text=texts, **kwargs)
        want = ref(images=images if with_images else None, text=texts, return_tensors="pt", **ref_kwargs)
        assert set(got) == set(want)
        for key in ("input_ids", "attention_mask"):
            assert torch.equal(got[key], want[key]), (key, with_images)
            assert got[key].dtype == torch.long
        if with_images:
            torch.testing.assert_close(got["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)


def test_decode_equals_reference(pair):
    ours, ref = pair
    rng = np.random.default_rng(0)
    sequences = [ref.tokenizer(t)["input_ids"] for t in TEXTS]
    sequences += [rng.integers(0, len(ref.tokenizer), 12).tolist() for _ in range(20)]
    assert ours.batch_decode(sequences) == ref.batch_decode(sequences, skip_special_tokens=True)
    for seq in sequences:
        assert ours.decode(seq, skip_special_tokens=False) == ref.tokenizer.decode(
            seq, skip_special_tokens=False
        )
    assert ours.decode(torch.tensor(sequences[1])) == ref.tokenizer.decode(
        sequences[1], skip_special_tokens=True
    )


def _edit(directory: Path, name: str, fn) -> None:
    path = directory / name
    data = json.loads(path.read_text()) if path.exists() else {}
    fn(data)
    path.write_text(json.dumps(data))


def _v4_opt_config(c):
    # released OPT checkpoints: add_bos_token, added_tokens_decoder, cleanup on, left padding
    c.update(add_bos_token=True, clean_up_tokenization_spaces=True, padding_side="left")
    c["added_tokens_decoder"] = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in ((1, "<pad>"), (2, "</s>"))
    }


def _bytelevel_file(t):
    t["post_processor"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": False,
        "use_regex": True,
    }
    t["normalizer"] = {"type": "NFC"}
    t["pre_tokenizer"]["add_prefix_space"] = True


def _drop_image_token(t):
    t["added_tokens"] = [a for a in t["added_tokens"] if a["content"] != "<image>"]


VARIANTS = {
    # (checkpoint, tokenizer_config edit, tokenizer.json edit, special_tokens_map.json)
    "opt-v4-config": ("opt", _v4_opt_config, _bytelevel_file, None),
    "opt-legacy-map": (
        "opt",
        lambda c: c.update(add_prefix_space=True),
        _drop_image_token,
        {"bos_token": "<s>", "pad_token": {"content": "<unk>", "normalized": False}},
    ),
    "t5-no-extra-ids": (
        "t5",
        lambda c: (
            [c.pop(k, None) for k in ("extra_ids", "extra_special_tokens")]
            and c.update(clean_up_tokenization_spaces=True)
        ),
        lambda t: t.update(post_processor=None, normalizer={"type": "Lowercase"}),
        None,
    ),
    "bert-cased": (
        "itm",
        lambda c: c.update(do_lower_case=False, clean_up_tokenization_spaces=True, strip_accents=True),
        _drop_image_token,
        None,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tokenizer_variants_match_reference(request, tmp_path, variant):
    """The reference rebuilds parts of the pipeline from the tokenizer class: follow it, not the file."""
    ckpt, edit_config, edit_file, special_map = VARIANTS[variant]
    source = request.getfixturevalue(f"{ckpt}_ckpt")
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "preprocessor_config.json",
    ):
        if (source / name).exists():
            shutil.copy(source / name, tmp_path / name)
    _edit(tmp_path, "tokenizer_config.json", edit_config)
    _edit(tmp_path, "tokenizer.json", edit_file)
    if special_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    ours, ref = Processor.from_pretrained(tmp_path), _reference(tmp_path)
    for text in TEXTS:
        ids = ref.tokenizer(text)["input_ids"]
        assert ours.tokenizer.encode(text) == [ids], text
        assert ours.decode(ids) == ref.tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.tokenizer.vocab_size == len(ref.tokenizer)
    assert ours.image_token_id == ref.tokenizer.convert_tokens_to_ids("<image>")
    texts = ["a red cube", "Question: what? Answer:"]
    got, want = (
        ours(images=_picture(), text=texts),
        ref(images=_picture(), text=texts, return_tensors="pt", padding=True),
    )
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(
        got["attention_mask"], want["attention_mask"]
    )


def test_explicit_overrides(opt_ckpt, opt_legacy_ckpt):
    plain = Processor.from_pretrained(opt_ckpt)
    legacy = Processor.from_pretrained(opt_legacy_ckpt)
    assert plain.num_query_tokens == 4 and legacy.num_query_tokens is None
    # no num_query_tokens: no prefix, as the reference
    out = legacy(images=_picture(), text="a cat")
    assert out["input_ids"].shape[1] == len(legacy.tokenizer.encode("a cat")[0])
    forced = Processor.from_pretrained(opt_legacy_ckpt, num_query_tokens=3, image_token_id=7)
    assert forced(images=_picture(), text="a cat")["input_ids"][0, :3].tolist() == [7, 7, 7]
    assert isinstance(TextTokenizer.from_pretrained(opt_ckpt), TextTokenizer)


# ============================================================================ errors


def _png_bytes(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    _picture(size[1], size[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    _picture(64, 64).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_image_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image at all\n")
    (tmp_path / "cut.png").write_bytes(_png_bytes()[: len(_png_bytes()) // 2])
    (tmp_path / "cut.jpg").write_bytes(_jpeg_bytes()[: len(_jpeg_bytes()) // 2])
    cases = {
        tmp_path / "missing.png": "no such file",
        tmp_path: "directory",
        tmp_path / "notes.txt": "not an image",
        tmp_path / "cut.png": "truncated",
        tmp_path / "cut.jpg": "truncated",
    }
    for source, words in cases.items():
        with pytest.raises(ImageError, match=words) as info:
            load_image(source)
        assert str(source) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="truncated"):
        load_image(_png_bytes()[:-30])
    with pytest.raises(ImageError, match="bytes"):
        load_image(b"hello, world")
    with pytest.raises(ImageError, match="URL"):
        load_image("https://example.com/cat.png")
    for bad in (
        3,
        None,
        np.zeros((5, 5, 7), np.uint8),
        np.full((4, 4, 3), 2.0),
        np.zeros((2, 2, 2, 2, 2)),
        np.zeros((0, 4, 3), np.uint8),
    ):
        with pytest.raises(ImageError):
            load_image(bad)
    with pytest.raises(ImageError, match="empty"):
        load_images([])


def test_decompression_bomb(monkeypatch):
    data = _png_bytes((40, 30))
    with pytest.raises(ImageError, match="1200 pixels|more than 1000"):
        load_image(data, max_pixels=1000)
    assert load_image(data, max_pixels=1200).size == (40, 30)
    # Pillow's own guard (a warning between its limit and twice it) is an error too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="bomb"):
        load_image(data)


def test_input_errors(opt_ckpt):
    processor = Processor.from_pretrained(opt_ckpt)
    for text, words in ([[], "empty"], [["ok", 3], r"text\[1\]"], [123, "string"], [[None], "text"]):
        with pytest.raises(InputError, match=words):
            processor(text=text)
    with pytest.raises(InputError):
        processor()
    with pytest.raises(InputError, match="max_length"):
        processor(images=_picture(), text="a", max_length=4)
    with pytest.raises(InputError, match="padding"):
        processor(text=["a", "b c d"], padding="sideways")
    with pytest.raises(InputError, match="different lengths"):
        processor(text=["a", "a red cube on the table"], padding=False)
    with pytest.raises(InputError, match="padding_side"):
        processor(text=["a", "b"], padding_side="middle")
    with pytest.raises(InputError, match="different sizes"):
        ImageProcessor(do_resize=False)([_picture(10, 10), _picture(12, 10)])
