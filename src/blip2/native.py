"""The native float32 linear kernel, compiled on first use (``csrc/skinny_linear.c``).

A decode step multiplies a handful of rows by every weight of the language model, so its time is
the time to read the weights. PyTorch's CPU kernels reach about half of the memory bandwidth at 2-8
rows; ``skinny_linear.c`` reaches nearly all of it, and with many rows (an image encoder) it is on
par with oneDNN (bench/README.md). It computes every output element the same way whatever the row
count, so ``blip2.models.layers.Linear`` runs it for every float32 CPU call and a row's result does not
depend on its batch. It is plain C with AVX2 or AVX-512 intrinsics: one kind per process
(``kernel_kind``: the widest the CPU has), built once per machine with the system's C compiler and
loaded with ``ctypes``; its OpenMP pragmas run on PyTorch's own OpenMP runtime, so
``torch.set_num_threads`` governs both.

Everything here is optional: where there is no C compiler, no AVX2+FMA, no Linux x86-64, or no
libgomp in the process (PyTorch's Linux wheels bring it), ``skinny_linear_kernel()`` returns None
and the layers keep PyTorch's kernels. ``BLIP2_NATIVE=0`` turns it off, ``BLIP2_NATIVE=avx2`` picks
the AVX2 kind on an AVX-512 CPU; the build goes to ``$BLIP2_CACHE`` (default ``~/.cache/blip2``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = "skinny_linear.c"
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
# The kernel's kinds, by the vector instructions each is built for: one per process (``kernel_kind``).
KINDS = {"avx2": ["-mavx2", "-mfma"], "avx512": ["-mavx512f", "-mavx2", "-mfma"]}
_OFF = ("0", "false", "no", "off")


def cache_dir() -> Path:
    if os.environ.get("BLIP2_CACHE"):
        return Path(os.environ["BLIP2_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blip2"


def kernel_kind() -> str:
    """The kind this process runs: ``BLIP2_NATIVE=avx2`` or ``avx512`` if set, else the widest the CPU has."""
    wanted = os.environ.get("BLIP2_NATIVE", "").strip().lower()
    if wanted in KINDS:
        return wanted
    return "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2"


def _unsupported_reason(kind: str) -> str | None:
    """Why the ``kind`` kernel cannot run here, or None if it can."""
    if os.environ.get("BLIP2_NATIVE", "1").strip().lower() in _OFF:
        return "turned off by BLIP2_NATIVE"
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"built for Linux x86-64 only, this is {sys.platform} {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512") or (kind == "avx512" and capability != "AVX512"):
        return f"the CPU lacks {kind.upper()} (PyTorch reports {capability})"
    try:
        with open("/proc/self/maps") as maps:
            if "libgomp" not in maps.read():
                return "PyTorch does not run on libgomp here (its OpenMP would be a second runtime)"
    except OSError:
        return "cannot read /proc/self/maps"
    return None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _build(source: bytes, compiler: str, flags: list[str] = FLAGS, stem: str = "skinny_linear") -> Path:
    """The shared object for ``source``, compiled with ``flags`` unless already in the cache.

    A cache folder that cannot be written (a read-only home) gives way to the temporary folder.
    """
    key = hashlib.sha256(source + compiler.encode() + " ".join(flags).encode()).hexdigest()[:16]
    name = f"{stem}-{key}.so"
    folders = [cache_dir() / "native", Path(tempfile.gettempdir()) / f"blip2-{os.getuid()}"]
    for folder in folders:
        if (folder / name).exists() and _private(folder):
            return folder / name
    for folder in folders:
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK) and _private(folder):
            return _compile(source, compiler, flags, folder / name)
    raise OSError(f"no private writable folder for the native kernel among {', '.join(map(str, folders))}")


def _private(folder: Path) -> bool:
    """Ours and writable by nobody else: code loaded from it cannot have been planted."""
    info = folder.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _compile(source: bytes, compiler: str, flags: list[str], target: Path) -> Path:
    source_file = target.with_suffix(f".{os.getpid()}.c")
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    source_file.write_bytes(source)
    t0 = time.perf_counter()
    try:
        subprocess.run(
            [compiler, *flags, str(source_file), "-o", str(partial)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(partial, target)  # atomic: a concurrent build writes the same bytes
    finally:
        source_file.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    log.info("compiled %s in %.1f s", target, time.perf_counter() - t0)
    return target


def _self_check(kernel) -> bool:
    """The built kernel against ``F.linear``, and a row alone against it in a batch, on shapes with
    every kind of tile edge and width tail (a miscompile must not go unnoticed)."""
    generator = torch.Generator().manual_seed(0)
    for rows, in_features, out_features in [(1, 8, 1), (3, 24, 7), (7, 37, 13), (13, 100, 9)]:
        x = torch.randn(rows, in_features, generator=generator)
        weight = torch.randn(out_features, in_features, generator=generator)
        bias = torch.randn(out_features, generator=generator)
        got = skinny_linear(x, weight, bias, kernel)
        if not torch.allclose(got, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5):
            return False
        if not torch.equal(skinny_linear(x[-1:], weight, bias, kernel), got[-1:]):
            return False
    return True


def _load_kind(
    kind: str, source_name: str | tuple[str, ...], stem: str, flags: list[str], what: str, bind, check
):
    """The compiled ``source_name`` of ``kind`` (several: compiled as one unit, in order), its function
    typed by ``bind(library)`` and passed by ``check(function)``, or None where it cannot be had
    (logged: a warning where it should have worked)."""
    reason = _unsupported_reason(kind)
    if reason is None and (compiler := _compiler()) is None:
        reason = "no C compiler (cc, gcc or clang; or $CC)"
    if reason is not None:
        log.info("no native %s %s: %s", kind, what, reason)
        return None
    try:
        names = (source_name,) if isinstance(source_name, str) else source_name
        source = b"\n".join((resources.files("blip2") / "csrc" / name).read_bytes() for name in names)
        function = bind(ctypes.CDLL(str(_build(source, compiler, [*flags, *KINDS[kind]], stem))))
        if check(function):
            log.info("native %s %s loaded", kind, what)
            return function
        reason = "the built kernel gave wrong results"
    except subprocess.CalledProcessError as e:
        reason = f"the C compiler failed: {e.stderr.decode(errors='replace').strip()[-500:]}"
    except (OSError, subprocess.SubprocessError) as e:
        reason = f"{type(e).__name__}: {e}"
    log.warning("no native %s %s: %s", kind, what, reason)
    return None


def _bind_skinny_linear(library: ctypes.CDLL):
    kernel = library.blip2_skinny_linear
    c_long, p = ctypes.c_long, ctypes.c_void_p
    kernel.argtypes = [p, c_long, c_long, p, p, c_long, p, ctypes.c_int]
    kernel.restype = ctypes.c_int
    return kernel


@functools.cache
def skinny_linear_kernel(kind: str | None = None):
    """The compiled ``blip2_skinny_linear`` of ``kind`` (default ``kernel_kind()``), or None where it
    cannot be had (logged once: a warning where it should have worked)."""
    return _load_kind(
        kind or kernel_kind(),
        SOURCE,
        "skinny_linear",
        FLAGS,
        "linear kernel",
        _bind_skinny_linear,
        _self_check,
    )


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel=None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for float32 CPU tensors, any number of rows.

    ``weight`` and ``bias`` must be contiguous; ``x`` is made so. Anything else is refused here: the
    kernel is handed raw pointers.
    """
    kernel = kernel or skinny_linear_kernel()
    out_features, in_features = weight.shape
    float32 = torch.float32
    if (
        x.shape[-1] != in_features
        or in_features == 0
        or x.dtype != float32
        or weight.dtype != float32
        or not (x.is_cpu and weight.is_cpu and weight.is_contiguous())
        or (
            bias is not None
            and (
                bias.dtype != float32
                or bias.shape != (out_features,)
                or not (bias.is_cpu and bias.is_contiguous())
            )
        )
    ):
        raise ValueError(
            f"skinny_linear takes contiguous float32 CPU tensors with x (..., {in_features}), "
            f"weight ({out_features}, {in_features}), bias ({out_features},)"
        )
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32)
    status = kernel(
        x.data_ptr(),
        x.numel() // in_features,
        in_features,
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out_features,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:  # unreachable after the checks above: the C side's own guard
        raise ValueError(
            f"skinny_linear: the kernel refused the sizes {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    return y


# ---- the low-bit kernels (csrc/lowbit_linear.c; used by blip2.quantize) ------------------------------

LOWBIT_SOURCE = "lowbit_linear.c"
# instruction sets are chosen per function in the source; no contraction but the written FMAs
LOWBIT_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


@functools.cache
def lowbit_library() -> ctypes.CDLL | None:
    """The compiled ``lowbit_linear.c`` with its functions typed, or None where it cannot be had (logged
    once). ``blip2.quantize.kernels`` checks its results before using it."""
    reason = _unsupported_reason("avx2")  # it picks AVX-512 paths itself where the CPU has them
    if reason is None and (compiler := _compiler()) is None:
        reason = "no C compiler (cc, gcc or clang; or $CC)"
    if reason is None:
        try:
            source = (resources.files("blip2") / "csrc" / LOWBIT_SOURCE).read_bytes()
            library = ctypes.CDLL(str(_build(source, compiler, LOWBIT_FLAGS, "lowbit_linear")))
            library.blip2_lowbit_cpu_kinds.argtypes = []
            library.blip2_lowbit_cpu_kinds.restype = ctypes.c_int
            # (layer description, x, rows, y, threads); the description is blip2.quantize.kernels.NativeLayer
            p = ctypes.c_void_p
            library.blip2_lowbit_linear.argtypes = [p, p, ctypes.c_long, p, ctypes.c_int]
            library.blip2_lowbit_linear.restype = ctypes.c_int
            # (w, rows, in_features, padded, group, q, scales, mins, threads): blip2.quantize.int4's fit
            c_long = ctypes.c_long
            library.blip2_int4_fit.argtypes = [p, c_long, c_long, c_long, c_long, p, p, p, ctypes.c_int]
            library.blip2_int4_fit.restype = ctypes.c_int
            # (q, rows, padded, row0, qweight, threads): kernels.block_int4's layout, written in place
            library.blip2_int4_block.argtypes = [p, c_long, c_long, c_long, p, ctypes.c_int]
            library.blip2_int4_block.restype = None
            # (w, rows, in_features, padded, row0, qweight, scale, threads): blip2.quantize.int8's packing
            library.blip2_int8_quantize.argtypes = [p, c_long, c_long, c_long, c_long, p, p, ctypes.c_int]
            library.blip2_int8_quantize.restype = None
            return library
        except subprocess.CalledProcessError as e:
            reason = f"the C compiler failed: {e.stderr.decode(errors='replace').strip()[-500:]}"
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            reason = f"{type(e).__name__}: {e}"
    log.info("low-bit layers use PyTorch's kernels: %s", reason)
    return None


# ---- the decode-step attention kernel (csrc/decode_attention.c; used by blip2.models.layers) -----------

ATTENTION_SOURCE = "decode_attention.c"
# no contraction but the written FMAs: a score is scaled, then masked, as PyTorch does it
ATTENTION_FLAGS = [*FLAGS, "-ffp-contract=off"]


def _bind_decode_attention(library: ctypes.CDLL):
    kernel = library.blip2_decode_attention
    kernel.argtypes = [ctypes.c_char_p]  # the packed arguments (_ATTENTION_CALL)
    kernel.restype = ctypes.c_int
    return kernel


# decode_attention.c's Call: 8 pointers, 4 sizes, 15 strides, 2 output strides, scale, scaled, threads,
# write_at, q_scale, q_scaled.
# One packed argument: ctypes converts each argument of a call at some cost, and a step makes one call
# per layer.
_ATTENTION_CALL = struct.Struct("<8Q4q15q2qd3qdq")


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` in plain batched matmuls (``scale`` None: 1/sqrt(head_dim),
    1.0: none; a boolean mask's False is masked, a float mask is added)."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    if scale is None or scale != 1.0:
        scores = scores * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.softmax(-1), v)


def _attention_self_check(kernel) -> bool:
    """The built kernel against :func:`reference_attention`, and a row alone against it in a batch."""
    generator = torch.Generator().manual_seed(0)
    for batch, heads, length, head_dim in [(1, 1, 1, 1), (3, 2, 9, 13), (2, 3, 17, 40)]:
        q = torch.randn(batch, heads, 1, head_dim, generator=generator)
        k, v = (torch.randn(batch, heads, length, head_dim, generator=generator) for _ in range(2))
        keep = torch.rand(batch, 1, 1, length, generator=generator) > 0.3
        keep[..., 0] = True
        for mask, scale in [
            (None, None),
            (keep, 1.0),
            (torch.randn(batch, heads, 1, length, generator=generator), 0.3),
        ]:
            got = decode_attention(q, k, v, mask, scale, kernel)
            if not torch.allclose(got, reference_attention(q, k, v, mask, scale), rtol=1e-5, atol=1e-5):
                return False
            alone = decode_attention(
                q[-1:], k[-1:], v[-1:], None if mask is None else mask[-1:], scale, kernel
            )
            if not torch.equal(alone, got[-1:]):
                return False
    return True


@functools.cache
def decode_attention_kernel(kind: str | None = None):
    """The compiled ``blip2_decode_attention`` of ``kind`` (default ``kernel_kind()``), or None where it
    cannot be had (logged once)."""
    return _load_kind(
        kind or kernel_kind(),
        ATTENTION_SOURCE,
        "decode_attention",
        ATTENTION_FLAGS,
        "decode attention kernel",
        _bind_decode_attention,
        _attention_self_check,
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    kernel=None,
    new: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    q_scale: float | None = None,
) -> torch.Tensor:
    """:func:`reference_attention` for one query: float32 CPU q (B, H, 1, Dh), k and v (B, H, S, Dh),
    ``mask`` boolean or float broadcastable to (B, H, 1, S). Each (row, head) is computed alone, in a
    fixed order. The result is (B, H, 1, Dh), a view of (B, 1, H, Dh) storage (merging the heads
    after is free). Anything else is refused with ValueError: the kernel is handed raw pointers.

    ``new = (k_new, v_new, position)``, each (B, H, 1, Dh), first writes them into ``k`` and ``v`` (a
    KV cache's whole storage, written in place) at ``position``; S is then ``position + 1``: the
    positions [0, position] are attended to. ``q_scale``: ``q * q_scale`` (rounded as PyTorch does it)
    stands for ``q`` (OPT scales the query before the product).
    """
    kernel = kernel or decode_attention_kernel()
    batch, heads, _, head_dim = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    length = k.shape[2] if k.dim() == 4 else 0
    float32 = torch.float32
    shape = (batch, heads, length, head_dim)  # of k and v
    if new is not None:
        k_new, v_new, write_at = new
        if not (
            0 <= write_at < length
            and k_new.shape == v_new.shape == (batch, heads, 1, head_dim)
            and k_new.dtype == v_new.dtype == float32
            and k_new.is_cpu
            and v_new.is_cpu
            and k.stride(-1) == v.stride(-1) == 1
        ):
            raise ValueError(
                f"decode_attention: cannot write {tuple(k_new.shape)} at {write_at} of {tuple(k.shape)}"
            )
        k_new = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
        v_new = v_new if v_new.stride(-1) == 1 else v_new.contiguous()
        new_pointers = (k_new.data_ptr(), v_new.data_ptr())
        new_strides = (*k_new.stride()[:2], *v_new.stride()[:2])
        length = write_at + 1
    else:
        write_at, new_pointers, new_strides = -1, (0, 0), (0, 0, 0, 0)
    if (
        q.shape[2:] != (1, head_dim)
        or k.shape != shape
        or v.shape != shape
        or length == 0
        or head_dim == 0
        or not (q.dtype == k.dtype == v.dtype == float32)
        or not (q.is_cpu and k.is_cpu and v.is_cpu)
        or (mask is not None and (not mask.is_cpu or mask.dtype not in (torch.bool, float32)))
    ):
        raise ValueError(
            f"decode_attention takes float32 CPU q (B, H, 1, Dh), k and v (B, H, S, Dh), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    mask_float = mask_bool = 0
    mask_strides = (0, 0, 0)
    if mask is not None:
        mask_batch, mask_heads = mask.shape[:2] if mask.dim() == 4 else (0, 0)
        if mask_batch not in (1, batch) or mask_heads not in (1, heads) or mask.shape[2:] != (1, length):
            raise ValueError(f"decode_attention: a mask of shape {tuple(mask.shape)} for {shape}")
        strides = mask.stride()
        mask_strides = (
            0 if mask_batch == 1 else strides[0],
            0 if mask_heads == 1 else strides[1],
            strides[3],
        )
        if mask.dtype == torch.bool:
            mask_bool = mask.data_ptr()
        else:
            mask_float = mask.data_ptr()
    # (B, H, 1, Dh) over (B, 1, H, Dh) storage: merging the heads after is a view
    out = torch.empty_strided((batch, heads, 1, head_dim), (heads * head_dim, head_dim, head_dim, 1))
    q_strides, k_strides, v_strides = q.stride(), k.stride(), v.stride()
    call = _ATTENTION_CALL.pack(
        q.data_ptr(),
        mask_float,
        *new_pointers,
        k.data_ptr(),
        v.data_ptr(),
        mask_bool,
        out.data_ptr(),
        batch,
        heads,
        length,
        head_dim,
        q_strides[0],
        q_strides[1],
        *k_strides[:3],
        *v_strides[:3],
        *mask_strides,
        *new_strides,
        heads * head_dim,
        head_dim,
        head_dim**-0.5 if scale is None else scale,
        scale is None or scale != 1.0,
        torch.get_num_threads(),
        write_at,
        1.0 if q_scale is None else q_scale,
        q_scale is not None,
    )
    status = kernel(call)
    if status != 0:
        raise ValueError(f"decode_attention: the kernel refused {shape} (status {status})")
    return out


# ---- a whole decode step (csrc/decoder_step.c; used by blip2.models.decoder_step) -------------------

# compiled as one unit: the step calls the attention kernel directly
STEP_SOURCES = (ATTENTION_SOURCE, "decoder_step.c")

# What each linear layer of a native decoder is run by: (its description, x, rows, y, threads) -> status
# (blip2_lowbit_linear's signature).
LINEAR_FUNCTION = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int
)
BLOCK_LINEARS = ("q", "k", "v", "out", "fc1", "fc2")
BLOCK_NORMS = ("norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias")


class StepLinear(ctypes.Structure):
    """A linear layer as ``decoder_step.c`` calls it: a ``LINEAR_FUNCTION`` and its first argument."""

    _fields_ = [("run", ctypes.c_void_p), ("layer", ctypes.c_void_p)]


def _block_fields(linears: tuple[str, ...], norms: tuple[str, ...]) -> list[tuple[str, type]]:
    """A C block struct's fields: its linear layers, then pointers to its norms' tensors."""
    return [(name, StepLinear) for name in linears] + [(name, ctypes.c_void_p) for name in norms]


class StepBlock(ctypes.Structure):
    """One layer of a native decoder (``Block`` in the C file); a norm without affine part is NULL."""

    _fields_ = _block_fields(BLOCK_LINEARS, BLOCK_NORMS)


class StepDecoder(ctypes.Structure):
    """A whole decoder (``Decoder`` in the C file), described once; ``blocks`` points at ``layers`` of
    :class:`StepBlock` (the caller keeps them alive)."""

    _fields_ = [
        ("blocks", ctypes.c_void_p),
        ("layers", ctypes.c_long),
        ("hidden", ctypes.c_long),
        ("heads", ctypes.c_long),
        ("mlp", ctypes.c_long),
        ("pre_norm", ctypes.c_long),
        ("eps", ctypes.c_double),
        ("q_scale", ctypes.c_double),
    ]


# decoder_step.c's Step: x, caches, mask, work; rows, max_len, position, mask_row, threads
_STEP_CALL = struct.Struct("<4Q5q")


def _step_binder(name: str):
    """A ``bind`` for :func:`_load_kind` of a decoder step's function ``name``: (the decoder, the packed
    step) -> status."""

    def bind(library: ctypes.CDLL):
        kernel = getattr(library, name)
        kernel.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        kernel.restype = ctypes.c_int
        return kernel

    return bind


_bind_decoder_step = _step_binder("blip2_decoder_step")


def _cpu_float32(t: torch.Tensor, contiguous: bool = True) -> bool:
    return t.dtype == torch.float32 and t.is_cpu and (t.is_contiguous() or not contiguous)


def _caches_fit(caches: list[tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, ...]) -> bool:
    """Every cache tensor (rows, heads, max_len, head_dim) of ``shape``, contiguous float32 on the CPU."""
    return all(t.shape == shape and _cpu_float32(t) for pair in caches for t in pair)


def _mask_fits(mask: torch.Tensor, rows: int, position: int) -> bool:
    """A boolean CPU (rows, > position) mask, its last dimension contiguous."""
    return (
        mask.dtype == torch.bool
        and mask.dim() == 2
        and mask.shape[0] == rows
        and mask.shape[1] > position
        and mask.stride(1) == 1
        and mask.is_cpu
    )


def _mask_row(mask: torch.Tensor) -> int:
    """Elements from one row of a (rows, positions) mask to the next."""
    return mask.stride(0) if mask.shape[0] > 1 else mask.shape[1]


def _pointers(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> ctypes.Array:
    """The tensors' addresses, pair by pair, as a C array."""
    return (ctypes.c_void_p * (2 * len(pairs)))(*(t.data_ptr() for pair in pairs for t in pair))


def _run_step(kernel, decoder: ctypes.Structure, call: bytes, what: str) -> None:
    """One packed decoder-step call; a failure is a MemoryError or a RuntimeError naming ``what``."""
    status = kernel(ctypes.addressof(decoder), call)
    if status == -2:
        raise MemoryError(f"{what}: out of memory")
    if status != 0:
        raise RuntimeError(f"{what}: a kernel failed (status {status})")


def decoder_step(
    kernel,
    decoder: StepDecoder,
    x: torch.Tensor,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    mask: torch.Tensor,
    position: int,
) -> None:
    """One decode step of ``decoder`` over contiguous float32 CPU ``x`` (rows, hidden), in place.

    ``caches``: per layer, keys and values (rows, heads, max_len, head_dim), contiguous float32 CPU,
    written at ``position``; ``mask``: boolean (rows, >= position + 1), last dimension contiguous, True
    where a row attends. Anything else is refused with ValueError before the kernel runs (it is handed
    raw pointers); a kernel failure is a RuntimeError (``x`` and the caches are then part-written).
    """
    rows, hidden = x.shape if x.dim() == 2 else (0, 0)
    heads = decoder.heads
    max_len = caches[0][0].shape[2] if caches and caches[0][0].dim() == 4 else 0
    if (
        rows == 0
        or hidden != decoder.hidden
        or not _cpu_float32(x)
        or len(caches) != decoder.layers
        or not 0 <= position < max_len
        or not _caches_fit(caches, (rows, heads, max_len, hidden // heads if heads else 0))
        or not _mask_fits(mask, rows, position)
    ):
        raise ValueError(
            f"decoder_step takes float32 CPU x (rows, {decoder.hidden}), {decoder.layers} caches of "
            f"(rows, {heads}, L, {decoder.hidden // max(heads, 1)}) and a boolean (rows, > {position}) mask"
        )
    pointers = _pointers(caches)
    work = torch.empty(rows * (5 * hidden + decoder.mlp))
    call = _STEP_CALL.pack(
        x.data_ptr(),
        ctypes.addressof(pointers),
        mask.data_ptr(),
        work.data_ptr(),
        rows,
        max_len,
        position,
        _mask_row(mask),
        torch.get_num_threads(),
    )
    _run_step(kernel, decoder, call, "decoder_step")


def _reference_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    position: int,
    mask: torch.Tensor | None,
    scale: float | None,
    group: int = 1,
) -> torch.Tensor:
    """The references' self-attention of a step: (rows, kv_heads, 1, head_dim) ``k``, ``v`` written into
    the layer's ``cache`` at ``position``, then ``q`` (rows, kv_heads * group, 1, head_dim) over positions
    [0, position], each key/value head repeated for ``group`` query heads; (rows, heads * head_dim)."""
    k_cache, v_cache = cache
    k_cache[:, :, position] = k[:, :, 0]
    v_cache[:, :, position] = v[:, :, 0]
    window = slice(0, position + 1)
    keys, values = (t[:, :, window].repeat_interleave(group, 1) for t in (k_cache, v_cache))
    attended = reference_attention(q, keys, values, mask, scale)
    return attended.reshape(q.shape[0], -1)


def _reference_rms(t: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5's and LLaMA's RMS norm, in the references."""
    return weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))


def reference_decoder_step(
    x: torch.Tensor,
    blocks: list[dict[str, torch.Tensor | None]],
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    mask: torch.Tensor,
    position: int,
    heads: int,
    q_scale: float,
    pre_norm: bool,
    eps: float,
) -> torch.Tensor:
    """What ``decoder_step.c`` computes, in PyTorch: ``blocks`` hold ``{name}_weight`` / ``_bias`` for
    the linear layers and ``norm1_weight`` ... for the norms; the caches are written at ``position``."""
    rows = x.shape[0]

    def linear(p, name, t):
        return F.linear(t, p[f"{name}_weight"], p[f"{name}_bias"])

    def norm(p, i, t):
        return F.layer_norm(t, t.shape[-1:], p[f"norm{i}_weight"], p[f"norm{i}_bias"], eps)

    keep = mask[:, None, None, : position + 1]
    for p, cache in zip(blocks, caches, strict=True):
        h = norm(p, 1, x) if pre_norm else x
        q, k, v = (linear(p, name, h).view(rows, heads, 1, -1) for name in ("q", "k", "v"))
        attended = _reference_cached_attention(q * q_scale, k, v, cache, position, keep, 1.0)
        x = x + linear(p, "out", attended)
        if not pre_norm:
            x = norm(p, 1, x)
        h = norm(p, 2, x) if pre_norm else x
        x = x + linear(p, "fc2", F.relu(linear(p, "fc1", h)))
        if not pre_norm:
            x = norm(p, 2, x)
    return x


def _caches_alike(got: list, want: list) -> bool:
    """Whether two lists of (keys, values) caches hold the same values, to float32 rounding."""
    return all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        for pair, want_pair in zip(got, want, strict=True)
        for a, b in zip(pair, want_pair, strict=True)
    )


class PythonLinearDecoder:
    """A random decoder for :func:`decoder_step` whose linear layers are run by a Python callback
    (``F.linear``): what the self-check (and the tests) hold the kernel to :func:`reference_decoder_step`
    with."""

    def __init__(
        self, seed: int, layers: int, hidden: int, heads: int, mlp: int, pre_norm: bool, affine: bool
    ):
        self.generator = torch.Generator().manual_seed(seed)
        self.heads, self.pre_norm, self.q_scale, self.eps = heads, pre_norm, 0.4, 1e-5
        self.callback = LINEAR_FUNCTION(self._run_linear)
        address = ctypes.cast(self.callback, ctypes.c_void_p).value
        sizes = dict.fromkeys(("q", "k", "v", "out"), (hidden, hidden)) | {
            "fc1": (mlp, hidden),
            "fc2": (hidden, mlp),
        }
        self.linears: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.blocks: list[dict[str, torch.Tensor | None]] = []
        self.array = (StepBlock * layers)()
        for entry in self.array:
            block: dict[str, torch.Tensor | None] = {}
            for name in BLOCK_LINEARS:
                weight = self.randn(*sizes[name]) * 0.3
                block[f"{name}_weight"], block[f"{name}_bias"] = weight, self.randn(sizes[name][0])
                self.linears.append((weight, block[f"{name}_bias"]))
                setattr(entry, name, StepLinear(address, len(self.linears)))  # its "layer": the 1-based index
            for name in BLOCK_NORMS:
                block[name] = self.randn(hidden) if affine else None
                setattr(entry, name, None if block[name] is None else block[name].data_ptr())
            self.blocks.append(block)
        self.decoder = StepDecoder(
            ctypes.addressof(self.array), layers, hidden, heads, mlp, pre_norm, self.eps, self.q_scale
        )

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def _run_linear(self, layer: int, x: int, rows: int, y: int, threads: int) -> int:
        weight, bias = self.linears[layer - 1]
        out_features, in_features = weight.shape
        inputs = torch.frombuffer(
            (ctypes.c_float * (rows * in_features)).from_address(x), dtype=torch.float32
        )
        outputs = torch.frombuffer(
            (ctypes.c_float * (rows * out_features)).from_address(y), dtype=torch.float32
        )
        for row in range(rows):  # each alone: a row's result does not depend on the others
            span = slice(row * in_features, (row + 1) * in_features)
            outputs[row * out_features : (row + 1) * out_features] = F.linear(inputs[span], weight, bias)
        return 0

    def step_inputs(self, rows: int, max_len: int, position: int):
        """x (rows, hidden), caches of ``max_len`` positions, and a mask hiding some earlier positions."""
        x = self.randn(rows, self.decoder.hidden)
        head_dim = self.decoder.hidden // self.heads
        caches = [(self.randn(rows, self.heads, max_len, head_dim), self.randn(rows, self.heads, max_len, head_dim))
                  for _ in self.blocks]  # fmt: skip
        mask = torch.rand(rows, position + 1, generator=self.generator) > 0.3
        mask[:, position] = True
        return x, caches, mask

    def compare(
        self, kernel, rows: int, max_len: int, position: int
    ) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """Runs one step both ways: (caches alike, the kernel's x, the formula's x)."""
        x, caches, mask = self.step_inputs(rows, max_len, position)
        want_caches = [(k.clone(), v.clone()) for k, v in caches]
        want = reference_decoder_step(
            x, self.blocks, want_caches, mask, position, self.heads, self.q_scale, self.pre_norm, self.eps
        )
        got = x.clone()
        decoder_step(kernel, self.decoder, got, caches, mask, position)
        return _caches_alike(caches, want_caches), got, want


def _decoder_step_self_check(kernel) -> bool:
    """A pre-norm decoder with layer-norm weights and a post-norm one without, on masked rows, against
    :func:`reference_decoder_step`."""
    return all(
        _step_agrees(
            PythonLinearDecoder(
                seed, layers=2, hidden=12, heads=3, mlp=20, pre_norm=pre_norm, affine=pre_norm
            ).compare(kernel, rows=3, max_len=7, position=4)
        )
        for seed, pre_norm in ((0, True), (1, False))
    )


def _step_agrees(compared: tuple[bool, torch.Tensor, torch.Tensor]) -> bool:
    """A self-check's verdict on one ``compare`` of a test decoder: caches alike, outputs close."""
    same_caches, got, want = compared
    return same_caches and torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def _load_step(kind: str | None, what: str, bind, check):
    """One of ``csrc/decoder_step.c``'s steps (the three share one compiled unit), as :func:`_load_kind`."""
    return _load_kind(kind or kernel_kind(), STEP_SOURCES, "decoder_step", ATTENTION_FLAGS, what, bind, check)


@functools.cache
def decoder_step_kernel(kind: str | None = None):
    """The compiled ``blip2_decoder_step`` of ``kind`` (default ``kernel_kind()``), or None where it
    cannot be had (logged once)."""
    return _load_step(kind, "decoder step", _bind_decoder_step, _decoder_step_self_check)


# ---- the image encoder's attention kernel (csrc/encoder_attention.c; used by blip2.models.vision) -------

# compiled after decode_attention.c, as one unit: it takes that file's vector layer
ENCODER_ATTENTION_SOURCES = (ATTENTION_SOURCE, "encoder_attention.c")


def _bind_encoder_attention(library: ctypes.CDLL):
    kernel = library.blip2_encoder_attention
    c_long, p = ctypes.c_long, ctypes.c_void_p
    # (qkv, batch, length, heads, head_dim, scale, out, threads)
    kernel.argtypes = [p, c_long, c_long, c_long, c_long, ctypes.c_float, p, ctypes.c_int]
    kernel.restype = ctypes.c_int
    return kernel


def _encoder_attention_self_check(kernel) -> bool:
    """The built kernel against :func:`reference_attention`, and an image alone against it in a batch,
    on shapes with every kind of tile edge (tokens and head_dim past a whole number of vectors)."""
    generator = torch.Generator().manual_seed(0)
    for batch, length, heads, head_dim in [(1, 1, 1, 1), (2, 9, 3, 13), (3, 37, 2, 40)]:
        qkv = torch.randn(batch, length, 3 * heads * head_dim, generator=generator)
        q, k, v = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        want = reference_attention(q, k, v, None, None).transpose(1, 2).reshape(batch, length, -1)
        got = encoder_attention(qkv, heads, None, kernel)
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            return False
        if not torch.equal(encoder_attention(qkv[-1:], heads, None, kernel), got[-1:]):
            return False
    return True


@functools.cache
def encoder_attention_kernel(kind: str | None = None):
    """The compiled ``blip2_encoder_attention`` of ``kind`` (default ``kernel_kind()``), or None where it
    cannot be had (logged once)."""
    return _load_kind(
        kind or kernel_kind(),
        ENCODER_ATTENTION_SOURCES,
        "encoder_attention",
        ATTENTION_FLAGS,
        "encoder attention kernel",
        _bind_encoder_attention,
        _encoder_attention_self_check,
    )


def encoder_attention(qkv: torch.Tensor, heads: int, scale: float | None = None, kernel=None) -> torch.Tensor:
    """Unmasked self-attention of every token over every token, from a fused q/k/v projection's output:
    float32 CPU ``qkv`` (B, N, 3 * H * Dh), laid out (3, H, Dh) per token -> (B, N, H * Dh), the heads
    merged. ``scale`` None: 1/sqrt(Dh). Each (image, head) is computed alone, in a fixed order. Anything
    else is refused with ValueError: the kernel is handed raw pointers."""
    kernel = kernel or encoder_attention_kernel()
    if (
        qkv.dim() != 3
        or qkv.dtype != torch.float32
        or not qkv.is_cpu
        or heads <= 0
        or qkv.shape[1] == 0
        or qkv.shape[2] == 0
        or qkv.shape[2] % (3 * heads)
    ):
        raise ValueError(
            f"encoder_attention takes a float32 CPU (B, N, 3 * heads * head_dim) qkv, got "
            f"{tuple(qkv.shape)} {qkv.dtype} on {qkv.device} for {heads} heads"
        )
    batch, length, width3 = qkv.shape
    head_dim = width3 // (3 * heads)
    qkv = qkv.contiguous()
    out = torch.empty(batch, length, heads * head_dim)
    scale = head_dim**-0.5 if scale is None else scale
    status = kernel(
        qkv.data_ptr(), batch, length, heads, head_dim, scale, out.data_ptr(), torch.get_num_threads()
    )
    if status != 0:
        raise ValueError(f"encoder_attention: the kernel refused {tuple(qkv.shape)} (status {status})")
    return out


# ---- a T5 decoder's step (blip2_t5_decoder_step in csrc/decoder_step.c; blip2.models.decoder_step) -------

T5_BLOCK_LINEARS = ("q", "k", "v", "o", "cross_q", "cross_o", "wi0", "wi1", "wo")
T5_BLOCK_NORMS = ("norm1", "norm_cross", "norm2")


class T5StepBlock(ctypes.Structure):
    """One layer of a native T5 decoder (``T5Block`` in the C file): linear layers, RMS norm weights."""

    _fields_ = _block_fields(T5_BLOCK_LINEARS, T5_BLOCK_NORMS)


class GatedStepDecoder(ctypes.Structure):
    """A whole T5 or LLaMA decoder (``GatedDecoder`` in the C file); ``blocks`` points at ``layers`` of
    :class:`T5StepBlock` or :class:`LlamaStepBlock` (the caller keeps them alive)."""

    _fields_ = [
        ("blocks", ctypes.c_void_p),
        ("layers", ctypes.c_long),
        ("hidden", ctypes.c_long),
        ("heads", ctypes.c_long),
        ("kv_heads", ctypes.c_long),  # T5's: its heads; a LLaMA's: fewer where its keys are grouped
        ("head_dim", ctypes.c_long),
        ("mlp", ctypes.c_long),
        ("eps", ctypes.c_double),
    ]


# T5Step: x, caches, cross, bias, cross_bias, work; rows, max_len, position, threads, bias_batch, bias_head,
# cross_len, cross_batch, cross_head, cross_pos, cross_bias_row
_T5_STEP_CALL = struct.Struct("<6Q11q")


_bind_t5_decoder_step = _step_binder("blip2_t5_decoder_step")


def t5_decoder_step(
    kernel,
    decoder: GatedStepDecoder,
    x: torch.Tensor,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    cross: list[tuple[torch.Tensor, torch.Tensor]],
    bias: torch.Tensor,
    cross_bias: torch.Tensor,
    position: int,
) -> None:
    """One decode step of a T5 ``decoder`` over contiguous float32 CPU ``x`` (rows, hidden), in place.

    ``caches``: per layer, the self-attention's keys and values (rows, heads, max_len, head_dim),
    contiguous, written at ``position``; ``cross``: per layer, the encoder's keys and values (rows, heads,
    L, head_dim), every layer's alike strided, last dimension contiguous; ``bias``: the self-attention's
    additive float (rows or 1, heads, 1, >= position + 1), last dimension contiguous; ``cross_bias``: the
    encoder's additive float (rows, 1, 1, L), contiguous. Anything else is refused with ValueError before
    the kernel runs (it is handed raw pointers); a kernel failure is a RuntimeError.
    """
    rows, hidden = x.shape if x.dim() == 2 else (0, 0)
    heads, head_dim = decoder.heads, decoder.head_dim
    max_len = caches[0][0].shape[2] if caches and caches[0][0].dim() == 4 else 0
    cross_len = cross[0][0].shape[2] if cross and cross[0][0].dim() == 4 else 0
    cross_strides = cross[0][0].stride() if cross_len else ()
    if (
        rows == 0
        or hidden != decoder.hidden
        or not _cpu_float32(x)
        or len(caches) != decoder.layers
        or len(cross) != decoder.layers
        or not 0 <= position < max_len
        or not _caches_fit(caches, (rows, heads, max_len, head_dim))
        or not all(
            t.shape == (rows, heads, cross_len, head_dim)
            and _cpu_float32(t, contiguous=False)
            and t.stride() == cross_strides
            for pair in cross
            for t in pair
        )
        or cross_strides[-1] != 1
        or not _cpu_float32(bias, contiguous=False)
        or bias.dim() != 4
        or bias.shape[0] not in (1, rows)
        or bias.shape[1:3] != (heads, 1)
        or bias.shape[3] <= position
        or bias.stride(3) != 1
        or not _cpu_float32(cross_bias)
        or cross_bias.shape != (rows, 1, 1, cross_len)
    ):
        raise ValueError(
            f"t5_decoder_step takes float32 CPU x (rows, {decoder.hidden}), {decoder.layers} caches of "
            f"(rows, {heads}, L, {head_dim}), as many encoder keys and values, and additive biases"
        )
    caches_array, cross_array = _pointers(caches), _pointers(cross)
    inner = heads * head_dim
    work = torch.empty(rows * (2 * hidden + 4 * inner + 2 * decoder.mlp))
    call = _T5_STEP_CALL.pack(
        x.data_ptr(),
        ctypes.addressof(caches_array),
        ctypes.addressof(cross_array),
        bias.data_ptr(),
        cross_bias.data_ptr(),
        work.data_ptr(),
        rows,
        max_len,
        position,
        torch.get_num_threads(),
        0 if bias.shape[0] == 1 else bias.stride(0),
        bias.stride(1),
        cross_len,
        *cross_strides[:3],
        cross_len,
    )
    _run_step(kernel, decoder, call, "t5_decoder_step")


def reference_t5_decoder_step(
    x: torch.Tensor,
    blocks: list[dict[str, torch.Tensor]],
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    cross: list[tuple[torch.Tensor, torch.Tensor]],
    bias: torch.Tensor,
    cross_bias: torch.Tensor,
    position: int,
    heads: int,
    eps: float,
) -> torch.Tensor:
    """What ``blip2_t5_decoder_step`` computes, in PyTorch: ``blocks`` hold ``{name}_weight`` for the
    linear layers and ``norm1`` ... for the norms; the caches are written at ``position``."""
    rows = x.shape[0]

    def rms(t, weight):
        return _reference_rms(t, weight, eps)

    for p, cache, (k_cross, v_cross) in zip(blocks, caches, cross, strict=True):
        h = rms(x, p["norm1"])
        q, k, v = (F.linear(h, p[f"{name}_weight"]).view(rows, heads, 1, -1) for name in ("q", "k", "v"))
        attended = _reference_cached_attention(q, k, v, cache, position, bias[..., : position + 1], 1.0)
        x = x + F.linear(attended, p["o_weight"])
        q = F.linear(rms(x, p["norm_cross"]), p["cross_q_weight"]).view(rows, heads, 1, -1)
        attended = reference_attention(q, k_cross, v_cross, cross_bias, 1.0).reshape(rows, -1)
        x = x + F.linear(attended, p["cross_o_weight"])
        h = rms(x, p["norm2"])
        gated = F.gelu(F.linear(h, p["wi0_weight"]), approximate="tanh") * F.linear(h, p["wi1_weight"])
        x = x + F.linear(gated, p["wo_weight"])
    return x


class _PythonLinearGatedDecoder(PythonLinearDecoder):
    """A random T5 or LLaMA decoder for their native steps, its linear layers (no biases) run by a Python
    callback and its RMS norms' weights near 1; ``sizes``: each linear layer's (out, in)."""

    BLOCK, LINEARS, NORMS = T5StepBlock, T5_BLOCK_LINEARS, T5_BLOCK_NORMS

    def __init__(
        self,
        seed: int,
        layers: int,
        hidden: int,
        heads: int,
        head_dim: int,
        mlp: int,
        sizes: dict,
        kv_heads: int | None = None,
    ):
        self.generator = torch.Generator().manual_seed(seed)
        self.heads, self.head_dim, self.eps = heads, head_dim, 1e-6
        self.kv_heads = kv_heads or heads
        self.callback = LINEAR_FUNCTION(self._run_linear)
        address = ctypes.cast(self.callback, ctypes.c_void_p).value
        self.linears: list[tuple[torch.Tensor, None]] = []
        self.blocks: list[dict[str, torch.Tensor]] = []
        self.array = (self.BLOCK * layers)()
        for entry in self.array:
            block: dict[str, torch.Tensor] = {}
            for name in self.LINEARS:
                block[f"{name}_weight"] = self.randn(*sizes[name]) * 0.3
                self.linears.append((block[f"{name}_weight"], None))
                setattr(entry, name, StepLinear(address, len(self.linears)))  # its "layer": the 1-based index
            for name in self.NORMS:
                block[name] = 1 + 0.2 * self.randn(hidden)
                setattr(entry, name, block[name].data_ptr())
            self.blocks.append(block)
        self.decoder = GatedStepDecoder(
            ctypes.addressof(self.array), layers, hidden, heads, self.kv_heads, head_dim, mlp, self.eps
        )


class PythonLinearT5Decoder(_PythonLinearGatedDecoder):
    """A random T5 decoder for :func:`t5_decoder_step` whose linear layers are run by a Python callback:
    what the self-check (and the tests) hold the kernel to :func:`reference_t5_decoder_step` with."""

    def __init__(self, seed: int, layers: int, hidden: int, heads: int, head_dim: int, mlp: int):
        inner = heads * head_dim
        sizes = dict.fromkeys(("q", "k", "v", "cross_q"), (inner, hidden)) | {
            "o": (hidden, inner),
            "cross_o": (hidden, inner),
            "wi0": (mlp, hidden),
            "wi1": (mlp, hidden),
            "wo": (hidden, mlp),
        }
        super().__init__(seed, layers, hidden, heads, head_dim, mlp, sizes)

    def compare(self, kernel, rows: int, max_len: int, position: int, cross_len: int):
        """Runs one step both ways: (caches alike, the kernel's x, the formula's x)."""
        heads, head_dim = self.heads, self.head_dim
        x = self.randn(rows, self.decoder.hidden)
        caches = [tuple(self.randn(rows, heads, max_len, head_dim) for _ in range(2)) for _ in self.blocks]
        # the encoder's keys and values as T5 keeps them: heads split from (rows, L, heads * head_dim)
        cross = [
            tuple(self.randn(rows, cross_len, heads * head_dim).view(rows, cross_len, heads, -1).transpose(1, 2)
                  for _ in range(2))
            for _ in self.blocks
        ]  # fmt: skip
        bias = self.randn(1, heads, 1, max_len)
        bias[..., position - 1] = torch.finfo(torch.float32).min  # a hidden position
        cross_bias = torch.zeros(rows, 1, 1, cross_len)
        cross_bias[0, ..., -1] = torch.finfo(torch.float32).min  # encoder padding
        want_caches = [(k.clone(), v.clone()) for k, v in caches]
        want = reference_t5_decoder_step(
            x, self.blocks, want_caches, cross, bias, cross_bias, position, heads, self.eps
        )
        got = x.clone()
        t5_decoder_step(kernel, self.decoder, got, caches, cross, bias, cross_bias, position)
        return _caches_alike(caches, want_caches), got, want


def _t5_decoder_step_self_check(kernel) -> bool:
    """A 2-layer T5 decoder (its inner width unlike its hidden one) on masked rows, against
    :func:`reference_t5_decoder_step`."""
    decoder = PythonLinearT5Decoder(0, layers=2, hidden=12, heads=3, head_dim=5, mlp=20)
    return _step_agrees(decoder.compare(kernel, rows=3, max_len=7, position=4, cross_len=6))


@functools.cache
def t5_decoder_step_kernel(kind: str | None = None):
    """The compiled ``blip2_t5_decoder_step`` of ``kind`` (default ``kernel_kind()``), or None where it
    cannot be had (logged once)."""
    return _load_step(kind, "T5 decoder step", _bind_t5_decoder_step, _t5_decoder_step_self_check)


# ---- a LLaMA decoder's step (blip2_llama_decoder_step in csrc/decoder_step.c; models.decoder_step) -------

LLAMA_BLOCK_LINEARS = ("q", "k", "v", "o", "wi0", "wi1", "wo")
LLAMA_BLOCK_NORMS = ("norm1", "norm2")


class LlamaStepBlock(ctypes.Structure):
    """One layer of a native LLaMA decoder (``LlamaBlock`` in the C file)."""

    _fields_ = _block_fields(LLAMA_BLOCK_LINEARS, LLAMA_BLOCK_NORMS)


# LlamaStep: x, caches, mask, cos, sin, work; rows, max_len, position, mask_row, threads
_LLAMA_STEP_CALL = struct.Struct("<6Q5q")


_bind_llama_decoder_step = _step_binder("blip2_llama_decoder_step")


def llama_decoder_step(
    kernel,
    decoder: GatedStepDecoder,
    x: torch.Tensor,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    mask: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position: int,
) -> None:
    """One decode step of a LLaMA ``decoder`` over contiguous float32 CPU ``x`` (rows, hidden), in place.

    ``caches`` and ``mask`` as :func:`decoder_step`'s, the caches (rows, kv_heads, max_len, head_dim);
    ``cos``, ``sin``: each row's rotation (rows, head_dim), contiguous. Anything else is refused with
    ValueError before the kernel runs; a kernel failure is a RuntimeError.
    """
    rows, hidden = x.shape if x.dim() == 2 else (0, 0)
    heads, kv_heads, head_dim = decoder.heads, decoder.kv_heads, decoder.head_dim
    max_len = caches[0][0].shape[2] if caches and caches[0][0].dim() == 4 else 0
    if (
        rows == 0
        or hidden != decoder.hidden
        or not _cpu_float32(x)
        or len(caches) != decoder.layers
        or not 0 <= position < max_len
        or not _caches_fit(caches, (rows, kv_heads, max_len, head_dim))
        or not (_cpu_float32(cos) and _cpu_float32(sin) and cos.shape == sin.shape == (rows, head_dim))
        or not _mask_fits(mask, rows, position)
    ):
        raise ValueError(
            f"llama_decoder_step takes float32 CPU x (rows, {decoder.hidden}), {decoder.layers} caches of "
            f"(rows, {kv_heads}, L, {head_dim}), a boolean (rows, > {position}) mask and (rows, {head_dim}) "
            "cos, sin"
        )
    pointers = _pointers(caches)
    work = torch.empty(rows * (2 * hidden + 4 * heads * head_dim + 2 * decoder.mlp))
    call = _LLAMA_STEP_CALL.pack(
        x.data_ptr(),
        ctypes.addressof(pointers),
        mask.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        work.data_ptr(),
        rows,
        max_len,
        position,
        _mask_row(mask),
        torch.get_num_threads(),
    )
    _run_step(kernel, decoder, call, "llama_decoder_step")


def reference_llama_decoder_step(
    x: torch.Tensor,
    blocks: list[dict[str, torch.Tensor]],
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    mask: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position: int,
    heads: int,
    eps: float,
    kv_heads: int | None = None,
) -> torch.Tensor:
    """What ``blip2_llama_decoder_step`` computes, in PyTorch (``blocks`` as
    :func:`reference_t5_decoder_step`'s); the caches (``kv_heads`` heads, default ``heads``) are written
    at ``position``; query head h attends with key/value head h // (heads // kv_heads)."""
    rows, kv_heads = x.shape[0], kv_heads or heads

    def rms(t, weight):
        return _reference_rms(t, weight, eps)

    def rotate(t):  # (rows, heads, 1, head_dim)
        half = t.shape[-1] // 2
        return t * cos[:, None, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None, None]

    keep = mask[:, None, None, : position + 1]
    for p, cache in zip(blocks, caches, strict=True):
        h = rms(x, p["norm1"])
        q = F.linear(h, p["q_weight"]).view(rows, heads, 1, -1)
        k, v = (F.linear(h, p[f"{name}_weight"]).view(rows, kv_heads, 1, -1) for name in ("k", "v"))
        attended = _reference_cached_attention(
            rotate(q), rotate(k), v, cache, position, keep, None, heads // kv_heads
        )
        x = x + F.linear(attended, p["o_weight"])
        h = rms(x, p["norm2"])
        x = x + F.linear(F.silu(F.linear(h, p["wi0_weight"])) * F.linear(h, p["wi1_weight"]), p["wo_weight"])
    return x


class PythonLinearLlamaDecoder(_PythonLinearGatedDecoder):
    """A random LLaMA decoder for :func:`llama_decoder_step` whose linear layers are run by a Python
    callback: what the self-check (and the tests) hold the kernel to :func:`reference_llama_decoder_step`
    with."""

    BLOCK, LINEARS, NORMS = LlamaStepBlock, LLAMA_BLOCK_LINEARS, LLAMA_BLOCK_NORMS

    def __init__(
        self,
        seed: int,
        layers: int,
        hidden: int,
        heads: int,
        head_dim: int,
        mlp: int,
        kv_heads: int | None = None,
    ):
        inner, kv_inner = heads * head_dim, (kv_heads or heads) * head_dim
        sizes = {
            "q": (inner, hidden),
            "k": (kv_inner, hidden),
            "v": (kv_inner, hidden),
            "o": (hidden, inner),
            "wi0": (mlp, hidden),
            "wi1": (mlp, hidden),
            "wo": (hidden, mlp),
        }
        super().__init__(seed, layers, hidden, heads, head_dim, mlp, sizes, kv_heads)

    def step_inputs(self, rows: int, max_len: int, position: int):
        """x, caches, a mask hiding some earlier positions, and each row's rotation at its own position."""
        kv_heads, head_dim = self.kv_heads, self.head_dim
        x = self.randn(rows, self.decoder.hidden)
        caches = [tuple(self.randn(rows, kv_heads, max_len, head_dim) for _ in range(2)) for _ in self.blocks]
        mask = torch.rand(rows, position + 1, generator=self.generator) > 0.3
        mask[:, position] = True
        angles = torch.randint(0, 50, (rows, 1), generator=self.generator) * self.randn(head_dim // 2).abs()
        angles = torch.cat([angles, angles], -1)
        return x, caches, mask, angles.cos(), angles.sin()

    def compare(self, kernel, rows: int, max_len: int, position: int):
        """Runs one step both ways: (caches alike, the kernel's x, the formula's x)."""
        x, caches, mask, cos, sin = self.step_inputs(rows, max_len, position)
        want_caches = [(k.clone(), v.clone()) for k, v in caches]
        want = reference_llama_decoder_step(
            x, self.blocks, want_caches, mask, cos, sin, position, self.heads, self.eps, self.kv_heads
        )
        got = x.clone()
        llama_decoder_step(kernel, self.decoder, got, caches, mask, cos, sin, position)
        return _caches_alike(caches, want_caches), got, want


def _llama_decoder_step_self_check(kernel) -> bool:
    """2-layer LLaMA decoders (their inner width unlike their hidden one; one with grouped key/value
    heads) on masked rows, against :func:`reference_llama_decoder_step`."""
    return all(
        _step_agrees(
            PythonLinearLlamaDecoder(
                0, 2, hidden=12, heads=heads, head_dim=6, mlp=20, kv_heads=kv_heads
            ).compare(kernel, rows=3, max_len=7, position=4)
        )
        for heads, kv_heads in [(3, 3), (4, 2)]
    )


@functools.cache
def llama_decoder_step_kernel(kind: str | None = None):
    """The compiled ``blip2_llama_decoder_step`` of ``kind`` (default ``kernel_kind()``), or None where it
    cannot be had (logged once)."""
    return _load_step(kind, "LLaMA decoder step", _bind_llama_decoder_step, _llama_decoder_step_self_check)
