#!/usr/bin/env bash
# The GPU measurements of the speed work (issue 13), as ONE command for a session lent a device machine:
#     bash benchmarks/device-check.sh        (about 6-8 minutes on one H100 / H200; results as JSON under $OUT)
# The device image has torch, timm, typer, rich and pandas; carry the rest as wheels in .whl/ (open_clip_torch,
# ftfy, submitit, datasets and what they need; see the device README). Nothing here downloads: backbones are random
# weights of the real shapes (bench never loads weights), so every figure is throughput, not accuracy.
set -uo pipefail
OUT=${OUT:-/tmp/cilbench-device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

bench() {  # NAME ARGS...: one bench, its JSON and its stderr under $OUT
    local name=$1; shift
    timeout 240 python3 -m cilbench "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.err"
    echo "$name: exit $?"
}
# ours against the PILOT-style pipeline, ViT-B/16 at 224 px, batch 48 (CICAE's) and 128 (SimpleCIL's)
bench cicae bench cicae --backbone vit-b16-in21k --device cuda --compare-naive --workers 8
bench simplecil bench simplecil --backbone vit-b16-in21k --device cuda --compare-naive --workers 8
# the cost of a host sync per step: the NaN guard on the host instead of the device
CILBENCH_DEFERRED_GUARD=0 bench cicae-host-guard bench cicae --backbone vit-b16-in21k --device cuda
# raw store against JPEG (adds nvJPEG), at the step time the CICAE bench measured (default 130 ms if absent)
step=$(python3 -c "import json; print(json.load(open('$OUT/cicae.json'))['modes'][0]['train_step_ms'])" 2>/dev/null)
bench store bench-store --device cuda --images 1024 --step-ms "${step:-130}"
ls -l "$OUT"
