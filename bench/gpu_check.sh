#!/usr/bin/env bash
# On the GPU machine, in one command (bench/README.md, "GPU: prepared check"):
#   run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=540)
# after bash bench/gpu_prepare.sh here. Installs the carried packages, runs tests/test_gpu.py, then
# bench/gpu_bench.py; everything it finds goes to $OUT (env.txt, tests.log, junit.xml, report.jsonl,
# bench.log, bench.json). Budget: ~5 min of tests, ~2.5 min of benchmarks.
# "bash bench/gpu_check.sh tests" or "... bench" runs one part only (a rerun).
set -uo pipefail
cd "$(dirname "$0")/.."
parts=${1:-tests bench}
OUT=${OUT:-/tmp/blip2-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

site=/tmp/blip2-site
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .gpu/wheels/*.whl || echo "wheels: install failed (the server and torchao checks will skip)"
fi
export PYTHONPATH="$PWD/src:$PWD/tests:$site:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export BLIP2_GPU_CHECKPOINTS="$PWD/.gpu/checkpoints" BLIP2_GPU_REPORT="$OUT/report.jsonl"

{
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv
    python3 - <<'PY'
import importlib
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
for name in ("transformers", "bitsandbytes", "torchao", "fastapi", "triton"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, "missing:", type(e).__name__, str(e)[:200])
from blip2.quantize.cuda import has_cuda_kernel

for op in ("_weight_int8pack_mm", "_weight_int4pack_mm", "_convert_weight_to_int4pack"):
    print(op, "CUDA kernel:", has_cuda_kernel(op))
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ $parts == *tests* ]]; then
    start=$(date +%s)
    timeout 290 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_gpu.py --junitxml="$OUT/junit.xml" \
        > "$OUT/tests.log" 2>&1
    echo "tests: exit $? in $(( $(date +%s) - start )) s"
    grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi

if [[ $parts == *bench* ]]; then
    start=$(date +%s)
    timeout 180 python3 bench/gpu_bench.py --budget 150 --shapes opt-2.7b small --out "$OUT/bench.json" \
        > "$OUT/bench.log" 2>&1
    echo "bench: exit $? in $(( $(date +%s) - start )) s"
    grep -vi warn "$OUT/bench.log" | tail -40
fi
