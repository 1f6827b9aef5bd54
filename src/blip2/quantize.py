"""Weight-only int8 linear layers for CPU inference (``blip2.load(..., quantize="int8")``).

Weights are stored int8 with one symmetric float scale per output channel
(``w ≈ q * scale[:, None]``, ``q`` in [-127, 127]). The vision encoder, the Q-Former and the language
model are quantized; the projection and the small heads stay float32. (The Q-Former is a third of the
small model's remaining memory once the rest is int8; quantizing it moves the logits' cosine to float32
by < 0.001 on the test and benchmark checkpoints.)

Kernel, chosen by measurement on the 2-core Xeon this project benchmarks on (one thread, float32
activations; notes in ``bench/README.md``):

| (rows, in -> out)         | float32 | fbgemm dynamic int8 | ``_weight_int8pack_mm`` f32 / bf16 act. |
|---------------------------|---------|---------------------|-----------------------------------------|
| 1, 1024 -> 4096  (decode) | 0.61 ms | 0.19 ms             | 3.8 ms / 0.27 ms                        |
| 1, 2560 -> 10240 (decode) | 8.7 ms  | 1.8 ms              | 58 ms / 4.6 ms                          |
| 257, 1024 -> 4096 (ViT)   | 21 ms   | 11 ms               | - / 52 ms                               |

fbgemm's dynamic kernel (``quantized::linear_dynamic``) wins at every size: it quantizes each call's
activations to 8 bits (one scale per call, reduced range so it cannot saturate on CPUs without
VNNI) and multiplies in int8 with int32 accumulation. Where that operator is missing, a portable
fallback dequantizes the weight for each call (slower, same storage).

Peak memory: layers are quantized one at a time from the memory-mapped checkpoint, and the float32
pages of each weight are handed back to the kernel (``madvise(MADV_DONTNEED)`` on the read-only
file mapping) as soon as its int8 copy exists, so the float32 model is never resident at once.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear

log = logging.getLogger(__name__)

QUANTIZED_PARTS = ("vision", "qformer", "language_model")


def quantize_weight(weight: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 (out, in), float32 (out,)) per-output-channel symmetric scales.

    Rows are done ``chunk`` at a time so that no float32 temporary of the whole weight is made.
    """
    out_features = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    for i in range(0, out_features, chunk):
        w = weight.detach()[i : i + chunk].float()
        s = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_()).clamp_min_(1e-12) / 127.0
        q[i : i + chunk] = (w / s[:, None]).round_().clamp_(-127, 127)
        scale[i : i + chunk] = s
    return q, scale


def _fbgemm_available() -> bool:
    try:
        return hasattr(torch.ops.quantized, "linear_dynamic") and any(
            e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm")
        )
    except Exception:  # noqa: BLE001 - a build without quantized ops
        return False


class Int8Linear(nn.Module):
    """A drop-in ``nn.Linear`` for inference with int8 weights and float32 input/output."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel: str):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kernel = kernel
        if kernel == "fbgemm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensor constructors are marked deprecated
                qw = torch._make_per_channel_quantized_tensor(
                    q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())
            self.register_buffer("scale", scale, persistent=False)
            self.bias = None
        else:
            self.register_buffer("qweight", q, persistent=False)
            self.register_buffer("scale", scale, persistent=False)
            self.bias = (
                None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
            )

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str | None = None) -> Int8Linear:
        return cls(*cls.arguments(linear, kernel))

    @staticmethod
    def arguments(
        linear: nn.Linear, kernel: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str]:
        """What the constructor takes for ``linear``: its weight quantized, its bias, the kernel. The
        quantizing is the cheap part; constructing packs the weight for fbgemm (one thread)."""
        kernel = kernel or ("fbgemm" if _fbgemm_available() else "dequant")
        q, scale = quantize_weight(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return q, scale, bias, kernel

    def int8_weight(self) -> torch.Tensor:
        if self.kernel == "fbgemm":
            qw, _ = torch.ops.quantized.linear_unpack(self._packed)
            return qw.int_repr()
        return self.qweight

    def dequantized(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.kernel == "fbgemm":
            shape = x.shape
            out = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]), self._packed, True)
            return out.view(*shape[:-1], self.out_features).to(dtype)
        out = F.linear(x, self.qweight.float()) * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


# ---- giving float32 pages back --------------------------------------------------------------------

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_libc = None


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of read-only-so-far file mappings of weight files in this process."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith((".safetensors", ".bin")):
                    lo, hi = (int(a, 16) for a in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


def _release(t: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Drop this tensor's resident pages if it lies in a file mapping (they refault from the file)."""
    global _libc
    if not mappings or t.device.type != "cpu":
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not any(lo <= start and end <= hi for lo, hi in mappings):
        return  # anonymous memory: dropping it would lose the data
    lo = (start + _PAGE - 1) // _PAGE * _PAGE
    hi = end // _PAGE * _PAGE
    if hi <= lo:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
    except (OSError, AttributeError):
        pass


# ---- the model ---------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_model_(
    model: nn.Module, parts: tuple[str, ...] = QUANTIZED_PARTS, kernel: str | None = None
) -> int:
    """Replace, in place, the ``nn.Linear`` layers of ``parts`` of a BLIP-2 model by ``Int8Linear``.

    Returns the number of layers replaced. Heads outside ``parts`` (projection, ITM/ITC) stay float32.
    Meant to run right after loading, on CPU, in float32 or half precision.
    """
    mappings = _file_mappings()
    count = 0
    # fbgemm packs a weight on one thread: pack on a pool while the next weight is quantized
    workers = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for part in parts:
            root = getattr(model, part, None)
            if root is None:
                continue
            for module in list(root.modules()):
                for child_name, child in list(module.named_children()):
                    if type(child) not in (nn.Linear, Linear):
                        continue
                    if child.weight.device.type != "cpu":
                        raise ValueError("int8 quantization is for CPU inference; load with device='cpu'")
                    job = pool.submit(Int8Linear, *Int8Linear.arguments(child, kernel))
                    pending.append((module, child_name, job))
                    del job
                    _release(child.weight, mappings)
                    del child
                    while len(pending) > 2 * workers:  # a few layers in flight: memory stays bounded
                        _install(pending.popleft())
                    count += 1
            log.debug("quantized %s", part)
        while pending:
            _install(pending.popleft())
    if hasattr(model, "language_model") and model.language_model is not None:
        _release_tied(model.language_model, mappings)
    _trim_heap()
    log.info("int8: replaced %d linear layers", count)
    return count


def _install(job: tuple[nn.Module, str, Future]) -> None:
    module, name, future = job
    setattr(module, name, future.result())
    _trim_heap()  # freed temporaries would otherwise pile up in the heap, layer after layer


def _release_tied(lm: nn.Module, mappings: list[tuple[int, int]]) -> None:
    """The token embedding was read whole to quantize a tied lm_head; lookups touch only a few rows."""
    embed = getattr(lm, "embed_tokens", None)
    if isinstance(embed, nn.Embedding):
        _release(embed.weight, mappings)


def _trim_heap() -> None:
    """Give the float32 temporaries' freed heap back to the system (glibc keeps it otherwise)."""
    try:
        libc = ctypes.CDLL(None)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
