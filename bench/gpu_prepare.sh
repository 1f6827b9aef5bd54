#!/usr/bin/env bash
# Here, on a machine with pip and no GPU: put what the GPU machine lacks into .gpu/ (ignored by git), which
# the device tool's run carries (carry=[".gpu"]) for bench/gpu_check.sh:
#   .gpu/wheels/       the server's packages (fastapi, starlette, pydantic, ...) and torchao, for Python 3.12
#   .gpu/site/         bitsandbytes, unpacked with its CUDA 13.0 library only (the whole wheel is 60 MB)
#   .gpu/checkpoints/  tests/factory_gpu.py's opt, t5, llama, instruct_t5 and itm (the wide one is built there)
# About 45 MB with the repository: under the tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu
mkdir -p .gpu/wheels .gpu/site .gpu/checkpoints

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
fetch() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$1" "${@:2}"
}
# versions that work together (those of this project's dev environment); the GPU image has anyio, httpx,
# h11, click, typing-extensions and prometheus-client already
fetch .gpu/wheels fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 \
    annotated-types==0.7.0 annotated-doc==0.0.7 typing-inspection==0.4.2 python-multipart==0.0.34 \
    uvicorn==0.54.0 torchao==0.17.0

tmp=$(mktemp -d)
fetch "$tmp" bitsandbytes==0.49.2
python3 - "$tmp"/bitsandbytes-*.whl .gpu/site <<'PY'
import sys
import zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        # the GPU machine's torch is built for CUDA 13.0: its library and the CPU one are all it loads
        if "/libbitsandbytes_" in name and not name.endswith(("_cuda130.so", "_cpu.so")):
            continue
        z.extract(name, out)
PY
rm -rf "$tmp"

PYTHONPATH=src python3 tests/factory_gpu.py .gpu/checkpoints opt t5 llama instruct_t5 itm
du -sh .gpu
