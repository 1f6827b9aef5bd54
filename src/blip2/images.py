"""Reading images from anything a user is likely to hold, and turning them into model pixels.

:class:`ImageProcessor` reproduces the reference's PIL-backend ``BlipImageProcessor`` (the one it uses
when torchvision is absent): Pillow resize with the configured filter, then ``x * rescale_factor`` in
float64 cast to float32, then ``(x - mean) / std`` in float32.

The conversion to RGB follows the reference processor input by input:

- a PIL image, array or tensor given in memory is converted the way the reference's ``convert_to_rgb``
  does it: anything with transparency (an alpha band, or a palette/greyscale ``transparency`` entry) is
  composited onto white, everything else goes through ``Image.convert("RGB")``;
- a path (or the raw bytes of a file) is opened, turned upright by its EXIF orientation and converted
  with a plain ``Image.convert("RGB")``, as the reference's own path loader does (so an alpha band is
  dropped, not composited; only a colour-key ``transparency`` entry, which survives that conversion,
  is then composited onto white, again as in the reference).

Every failure is an :class:`~blip2.errors.ImageError` whose one-line message names the source.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blip2.errors import CheckpointError, ImageError, InputError

if TYPE_CHECKING:  # torch is imported where it is needed: decode processes never need it
    import torch

# Largest image (width × height) read from a file or bytes; the same default as Pillow's own bomb guard.
MAX_IMAGE_PIXELS = 89_478_485


def image_extensions() -> set[str]:
    """The file suffixes Pillow opens (lower case, with the dot)."""
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def scan_images(root: Path, skip: Path | None = None, on_error=None) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``root``, sorted; hidden files and folders and ``skip`` (an
    index or output folder inside it) left out.
    A folder that cannot be listed is passed to ``on_error`` (path, message) and left out."""

    def unlistable(e: OSError) -> None:
        if on_error is not None:
            on_error(Path(e.filename), f"cannot list the folder ({e.strerror or e})")

    exts = image_extensions()
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (skip is None or here / d != skip)
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            (images if Path(name).suffix.lower() in exts else others).append(here / name)
    return images, others


ImageSource: TypeAlias = (
    "Image.Image | str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | torch.Tensor"
)


def load_image(source: Any, *, max_pixels: int | None = None) -> Image.Image:
    """Return ``source`` as a fully decoded RGB PIL image.

    ``source`` may be a PIL image, a path (``str`` or ``os.PathLike``), the bytes of an image file, a
    numpy array (``H×W``, ``H×W×C`` or ``C×H×W`` with C in 1, 3, 4; uint8, or float in [0, 1]) or a
    torch tensor of the same layouts. ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`) bounds the size
    of images read from files or bytes; Pillow's own guard (twice its ``MAX_IMAGE_PIXELS``) also applies.
    """
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageError(f"{source}: URLs are not fetched; download the image and pass its path or bytes")
    if isinstance(source, str | os.PathLike):
        return _open_file(Path(source), max_pixels)
    if isinstance(source, bytes | bytearray | memoryview):
        return _open_bytes(bytes(source), max_pixels)
    if _is_tensor(source):
        return _array_to_rgb(source.detach().cpu().numpy(), "tensor")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, "array")
    raise ImageError(
        f"cannot read an image from a {type(source).__name__}: "
        "pass a PIL image, a path, file bytes, a numpy array or a torch tensor"
    )


def load_images(sources: Any, *, max_pixels: int | None = None) -> list[Image.Image]:
    """:func:`load_image` over one source or an iterable of them; always returns a list."""
    if _is_single(sources):
        return [load_image(sources, max_pixels=max_pixels)]
    if not isinstance(sources, Iterable):
        raise ImageError(f"cannot read images from a {type(sources).__name__}")
    images = [load_image(s, max_pixels=max_pixels) for s in sources]
    if not images:
        raise ImageError("no images given: the list of images is empty")
    return images


def _is_single(source: Any) -> bool:
    if isinstance(source, Image.Image | str | os.PathLike | bytes | bytearray | memoryview):
        return True
    # An array or tensor of rank 4 is a batch; anything of lower rank is one image.
    return (isinstance(source, np.ndarray) or _is_tensor(source)) and source.ndim <= 3


def _is_tensor(source: Any) -> bool:
    torch = sys.modules.get("torch")  # no tensor exists before torch is imported
    return torch is not None and isinstance(source, torch.Tensor)


# --------------------------------------------------------------------------- files and bytes


def _open_file(path: Path, max_pixels: int | None) -> Image.Image:
    name = str(path)
    if not path.exists():
        raise ImageError(f"{name}: no such file")
    if path.is_dir():
        raise ImageError(f"{name}: is a directory, not an image file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{name}: cannot read the file ({e.strerror or e})") from e
    return _decode(data, name, max_pixels)


def _open_bytes(data: bytes, max_pixels: int | None) -> Image.Image:
    return _decode(data, f"<{len(data)} bytes>", max_pixels)


def _decode(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    if not data:
        raise ImageError(f"{name}: empty, no image data")
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice its limit: refuse those images too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limit:
                raise ImageError(
                    f"{name}: {width}x{height} image has more than {limit} pixels (decompression bomb guard)"
                )
            image.load()  # decode now, so that a truncated file fails here and not later
        except ImageError:
            raise
        except UnidentifiedImageError as e:
            raise ImageError(f"{name}: not an image file Pillow can read") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{name}: too many pixels, refused as a decompression bomb ({e})") from e
        except (OSError, SyntaxError, ValueError) as e:
            # Pillow reports truncated or corrupt data as OSError (or SyntaxError for some formats).
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ImageError(f"{name}: truncated or corrupt image ({detail})") from e
    try:
        image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: cannot convert the {image.mode} image to RGB ({e})") from e
    # The reference then runs its in-memory conversion too: a colour-key `transparency` that survived
    # the plain conversion (palette or RGB PNGs) is composited onto white there.
    return _pil_to_rgb(image)


# --------------------------------------------------------------------------- in-memory images


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"PIL image ({image.mode}, {image.size}): truncated or corrupt ({e})") from e
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"PIL image in mode {image.mode}: cannot convert to RGB ({e})") from e


def _array_to_rgb(array: np.ndarray, kind: str) -> Image.Image:
    what = f"{kind} of shape {tuple(array.shape)} and dtype {array.dtype}"
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        # Channels first when the first axis looks like channels, as the reference infers it.
        if array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        elif array.shape[-1] not in (1, 3, 4):
            raise ImageError(f"{what}: expected 1, 3 or 4 channels first or last")
    else:
        raise ImageError(f"{what}: expected H×W, H×W×C or C×H×W")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{what}: the image is empty")

    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ImageError(f"{what}: float pixels must lie in [0, 1]")
        white: float = 1.0
    elif np.issubdtype(array.dtype, np.integer):
        if array.dtype != np.uint8:
            if array.min() < 0 or array.max() > 255:
                raise ImageError(f"{what}: integer pixels must lie in [0, 255]")
            array = array.astype(np.uint8)
        white = 255.0
    else:
        raise ImageError(f"{what}: unsupported pixel type")

    channels = array.shape[-1]
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        # Composite onto white in float64, rounding integers, as the reference does for arrays.
        alpha = array[..., 3:4] / white
        blended = alpha * array[..., :3] + (1 - alpha) * white
        array = np.round(blended).astype(np.uint8) if white == 255.0 else blended.astype(array.dtype)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


# --------------------------------------------------------------------------- preprocessing


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow filter numbers (the reference stores these ints as `resample`).
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class ImageProcessor:
    """Resize, rescale and normalize RGB images into ``(B, 3, H, W)`` float32 pixels.

    ``size`` is ``(height, width)``. Instead of it, ``shortest_edge`` (optionally with ``longest_edge``)
    keeps the aspect ratio, as the reference's size forms of those names do.
    """

    size: tuple[int, int] | None = (384, 384)
    shortest_edge: int | None = None
    longest_edge: int | None = None
    resample: int = 3  # bicubic
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True  # images are always read as RGB (see blip2.images); kept for the record

    def __post_init__(self) -> None:
        if self.do_resize and self.size is None and self.shortest_edge is None:
            raise CheckpointError("image processor: resizing needs `size` or `shortest_edge`")
        if self.do_normalize and (len(self.image_mean) != 3 or len(self.image_std) != 3):
            raise CheckpointError("image processor: image_mean and image_std need 3 values (RGB)")
        if self.resample not in _RESAMPLE_NAMES.values():
            raise CheckpointError(f"image processor: unknown resample filter {self.resample!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessor:
        """Read a reference image-processor config (``preprocessor_config.json`` or the
        ``image_processor`` section of ``processor_config.json``); missing keys take BLIP's defaults."""
        if d.get("do_center_crop"):
            raise CheckpointError("image processor: center cropping is not supported (BLIP never crops)")
        kwargs: dict[str, Any] = {}
        if "size" in d and d["size"] is not None:
            kwargs.update(_parse_size(d["size"], d.get("default_to_square", True)))
        if d.get("resample") is not None:
            kwargs["resample"] = _parse_resample(d["resample"])
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(key) is not None:
                kwargs[key] = bool(d[key])
        if d.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(d["rescale_factor"])
        for key in ("image_mean", "image_std"):
            value = d.get(key)
            if value is not None:
                kwargs[key] = (
                    tuple(float(v) for v in value) if isinstance(value, list | tuple) else (float(value),) * 3
                )
        return cls(**kwargs)

    def __call__(self, images: Any) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` float32 for one image or a list of anything :func:`load_image` reads."""
        import torch

        arrays = [self.preprocess(image) for image in load_images(images)]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InputError(
                f"images of different sizes after preprocessing cannot be batched: {sorted(shapes)}"
            )
        return torch.from_numpy(np.stack(arrays))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image to ``(3, H, W)`` float32, step for step as the reference."""
        if self.do_resize:
            height, width = self.output_size(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        x = np.asarray(image)  # (H, W, 3) uint8
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float32)
            std = np.array(self.image_std, dtype=np.float32)
            x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size ``(height, width)`` an image of the given size is resized to."""
        if self.shortest_edge is None:
            assert self.size is not None
            return self.size
        short_target = self.shortest_edge
        if self.longest_edge is not None:
            # Shorter side to `shortest_edge` unless the longer one would pass `longest_edge`.
            raw: float | None = None
            lo, hi = float(min(height, width)), float(max(height, width))
            if hi / lo * short_target > self.longest_edge:
                raw = self.longest_edge * lo / hi
                short_target = int(round(raw))
            if (height <= width and height == short_target) or (width <= height and width == short_target):
                return height, width
            scale = raw if raw is not None else short_target
            if width < height:
                return int(scale * height / width), short_target
            return short_target, int(scale * width / height)
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(short_target * long / short)
        return (new_long, short_target) if width <= height else (short_target, new_long)


def _parse_size(size: Any, default_to_square: bool) -> dict[str, Any]:
    if isinstance(size, int):
        return {"size": (size, size)} if default_to_square else {"size": None, "shortest_edge": size}
    if isinstance(size, list | tuple) and len(size) == 2:
        return {"size": (int(size[0]), int(size[1]))}
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            return {"size": (int(size["height"]), int(size["width"]))}
        if "shortest_edge" in size:
            longest = size.get("longest_edge")
            return {
                "size": None,
                "shortest_edge": int(size["shortest_edge"]),
                "longest_edge": None if longest is None else int(longest),
            }
    raise CheckpointError(f"image processor: unsupported size {size!r} (use height/width or shortest_edge)")


def _parse_resample(value: Any) -> int:
    if isinstance(value, str):
        if value.lower() not in _RESAMPLE_NAMES:
            raise CheckpointError(f"image processor: unknown resample filter {value!r}")
        return _RESAMPLE_NAMES[value.lower()]
    return int(value)
