"""GPU speed: blip2 against the reference (`transformers`) in float16, and the int8 / int4 kernels.

    python bench/gpu_bench.py --out results.json                  # on the GPU machine (bench/gpu_check.sh)
    python bench/gpu_bench.py --device cpu --shapes tiny --budget 300   # a dry run of this script's code

Two parts, each stopping where ``--budget`` seconds run out (what was measured is kept):

- ``linear``: one linear layer of the released models' shapes, a decode step's few rows and an image
  encoder's many, float16 against each weight-only kernel blip2 offers on CUDA (``blip2.quantize.cuda``:
  int8 ``dequant`` eager and under ``torch.compile``, ``int8pack``, bitsandbytes LLM.int8, int4
  ``tinygemm``, bitsandbytes NF4) and, when importable, torchao's int8 / int4 weight-only: time per call
  and the weight bytes read per second. The numbers that pick the defaults.
- ``generate``: a random-weight checkpoint of each ``--shapes`` (bench/make_checkpoint.py, drawn on the
  device, written in float16), a batch of images, exactly ``--tokens`` new tokens, greedy: the
  reference's ``generate`` against blip2 eager, with ``compile=True`` (CUDA graphs), int8 and int4 (with
  graphs), and bitsandbytes' int8 (the model cards' ``load_in_8bit`` kernel). Tokens per second, the
  ratio to the reference, and whether the texts equal the reference's (float16 only).

Timings: a warm-up call (it also captures the graphs), then the median of ``--repeat``, the device
synchronised around each; blip2's image and prefill caches are cleared before each call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "bench")]

from make_checkpoint import write  # noqa: E402

import blip2  # noqa: E402
from blip2.quantize import cuda as qc  # noqa: E402
from factory import make_images  # noqa: E402

# (rows, in, out): OPT-2.7b's decode (1 and 8 rows) and its MLP, ViT-g's MLP over 257 tokens x 8 images
LINEAR_SHAPES = [(1, 2560, 10240), (8, 2560, 10240), (1, 10240, 2560), (2056, 1408, 6144)]


class Clock:
    def __init__(self, budget: float):
        self.end = time.perf_counter() + budget

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int, warmup: int = 1) -> tuple[float, object]:
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ---- one linear layer -------------------------------------------------------------------------------------


def linear_variants(layer: torch.nn.Linear, device: torch.device, compile_too: bool):
    """(name, module or function) for each kernel that can run here."""
    yield "float16", layer
    cuda = device.type == "cuda"
    yield "int8 dequant", qc.quantize_layer(layer, 8, device, "dequant")
    if cuda:
        if compile_too:  # a compile takes tens of seconds: the first (decode) shape only
            compiled = torch.compile(qc.quantize_layer(layer, 8, device, "dequant"), dynamic=False)
            yield "int8 dequant compiled", compiled
        if qc.has_cuda_kernel("_weight_int8pack_mm"):
            yield "int8 int8pack", qc.quantize_layer(layer, 8, device, "int8pack")
        yield "int4 tinygemm", qc.quantize_layer(layer, 4, device, "tinygemm")
    yield "int4 dequant", qc.quantize_layer(layer, 4, device, "dequant")
    if cuda:
        try:
            import bitsandbytes  # noqa: F401

            yield "int8 bitsandbytes", qc.quantize_layer(layer, 8, device, "bnb")
            yield "nf4 bitsandbytes", qc.quantize_layer(layer, 4, device, "bnb")
        except ImportError:
            pass
        yield from torchao_variants(layer, compile_too)


def torchao_variants(layer: torch.nn.Linear, compile_too: bool):
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001 - absent, or built for another torch
        print(f"torchao: not measured ({type(e).__name__}: {e})", file=sys.stderr)
        return
    for name, config in (
        ("torchao int8 compiled", Int8WeightOnlyConfig()),
        ("torchao int4", Int4WeightOnlyConfig()),
    ):
        if "compiled" in name and not compile_too:
            continue
        try:
            copy = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            copy = copy.to(layer.weight.device, layer.weight.dtype)
            copy.load_state_dict(layer.state_dict())
            quantize_(copy, config)
            yield name, torch.compile(copy, dynamic=False) if "compiled" in name else copy
        except Exception as e:  # noqa: BLE001 - a config this torchao / torch pair does not run
            print(f"{name}: not measured ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)


def bench_linear(device: torch.device, clock: Clock, repeat: int, rows: list[dict], save) -> None:
    for m, k, n in LINEAR_SHAPES:
        if clock.left() < 20:
            break
        torch.manual_seed(0)
        layer = torch.nn.Linear(k, n, bias=True).to(device, torch.float16)
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        with torch.inference_mode():
            expected = layer(x).float()
            for name, fn in linear_variants(layer, device, compile_too=(m, k, n) == LINEAR_SHAPES[0]):
                if clock.left() < 10:
                    break
                try:
                    with torch.inference_mode():
                        seconds, out = timed(lambda fn=fn, x=x: fn(x), device, repeat * 20, warmup=3)
                except Exception as e:  # noqa: BLE001 - a kernel that does not run here: say so
                    rows.append(
                        dict(rows_in_out=(m, k, n), kernel=name, error=f"{type(e).__name__}: {str(e)[:200]}")
                    )
                    continue
                weight_bytes = sum(t.numel() * t.element_size() for t in _tensors(fn))
                cos = float(F.cosine_similarity(out.float().flatten(), expected.flatten(), dim=0))
                rows.append(dict(rows_in_out=(m, k, n), kernel=name, us=seconds * 1e6, cosine=cos,
                                 weight_mb=weight_bytes / 1e6, gb_s=weight_bytes / seconds / 1e9))  # fmt: skip
                print(f"linear {m}x{k}->{n} {name:24s} {seconds * 1e6:9.1f} us  cos {cos:.5f}", flush=True)
        save()


def _tensors(fn) -> list[torch.Tensor]:
    module = getattr(fn, "_orig_mod", fn)
    return list(module.parameters()) + list(module.buffers()) if isinstance(module, torch.nn.Module) else []


# ---- whole generation ----------------------------------------------------------------------------------


def reference_generate(path: Path, device: torch.device):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float16).eval().to(device)
    proc = Blip2Processor.from_pretrained(str(path))
    proc.tokenizer.padding_side = "left"

    def run(images, prompts, n):
        inputs = proc(images=images, text=prompts, return_tensors="pt", padding=True).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.float16)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)
        return out[:, inputs["input_ids"].shape[1] :].tolist()

    return model, run


def ours_generate(path: Path, device: torch.device, **options):
    pipe = blip2.load(path, device=device, dtype=torch.float16, **options)

    def run(images, prompts, n):
        pipe.prefix_cache.clear()
        pipe.prefill_cache.clear()
        return pipe.generate_ids(images, prompts, max_new_tokens=n, min_new_tokens=n)

    return pipe, run


def bench_generate(shape: str, device: torch.device, clock: Clock, args, rows: list[dict], save) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        path = write(shape, Path(tmp) / shape, device=str(device), file_dtype=torch.float16)
        print(f"{shape}: checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
        variants = [("reference", None), ("blip2", {}), ("blip2 graphs", {"compile": True})]
        if device.type == "cuda":
            variants += [
                ("blip2 int8 graphs", {"compile": True, "quantize": "int8"}),
                ("blip2 int4 graphs", {"compile": True, "quantize": "int4"}),
                ("blip2 int8 bitsandbytes", {"quantize": "int8:bnb"}),
            ]
            if shape == args.shapes[0]:  # compiling takes a minute or so: the first shape only
                variants.append(("blip2 int8 inductor+graphs", {"compile": "inductor", "quantize": "int8"}))
        elif args.dry_run_static:
            variants.append(("blip2 static", {"compile": "static"}))
        reference_ids: dict[int, list] = {}
        for name, options in variants:
            if clock.left() < 30:
                print(f"{shape}: out of time before {name}", flush=True)
                break
            try:
                t0 = time.perf_counter()
                holder, run = (
                    reference_generate(path, device)
                    if options is None
                    else ours_generate(path, device, **options)
                )
                load = time.perf_counter() - t0
                for batch in args.batch[:1] if "inductor" in name else args.batch:  # one compile
                    images = make_images(batch, 224, seed=batch)
                    prompts = ["a photo of"] * batch
                    call = partial(run, images, prompts, args.tokens)
                    seconds, ids = timed(call, device, args.repeat)
                    if options is None:
                        reference_ids[batch] = ids
                    same = ids == reference_ids.get(batch)
                    tps = batch * args.tokens / seconds
                    ref_row = next(
                        (
                            r
                            for r in rows
                            if (r.get("shape"), r.get("variant"), r.get("batch"))
                            == (shape, "reference", batch)
                        ),
                        None,
                    )
                    ratio = ref_row["seconds"] / seconds if ref_row else None
                    rows.append(dict(shape=shape, variant=name, batch=batch, tokens=args.tokens, seconds=seconds,
                                     tokens_per_s=tps, speedup=ratio, load_s=load, texts_equal_reference=same))  # fmt: skip
                    print(f"{shape} b{batch} {name:28s} {tps:9.1f} tok/s  x{ratio or 1:.2f}  "
                          f"same={same}", flush=True)  # fmt: skip
                del holder, run  # free the device before the next variant
                save()
            except Exception as e:  # noqa: BLE001 - one variant failing leaves the others' numbers
                rows.append(dict(shape=shape, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
                print(f"{shape} {name}: {type(e).__name__}: {e}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", nargs="+", default=["opt-2.7b", "small"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, default=240, help="seconds for everything")
    ap.add_argument("--parts", nargs="+", default=["linear", "generate"])
    ap.add_argument("--tmp", default=None, help="where checkpoints are written (default: the system's)")
    ap.add_argument("--dry-run-static", action="store_true", help="off CUDA: add compile='static'")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    clock = Clock(args.budget)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}  # fmt: skip
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    def save() -> None:  # after every measurement: a run cut short keeps what it measured
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")

    if "linear" in args.parts:
        results["linear"] = []
        bench_linear(device, clock, args.repeat, results["linear"], save)
    if "generate" in args.parts:
        results["generate"] = []
        for shape in args.shapes:
            bench_generate(shape, device, clock, args, results["generate"], save)
    save()
    print(f"done with {clock.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
