#!/usr/bin/env bash
# The GPU fast path, measured: ONE prepared script for a CUDA machine that has torch and torchvision
# but no network. Run it from the repository root.
#
#   1. here (with network), once:   bash bench/gpu_check.sh --fetch-wheels
#      downloads the wheels the runner needs beyond torch/torchvision/click/pluggy/pyyaml/tqdm/numpy
#      (SQLAlchemy, pydantic, torchinfo, ...) for Python $GPU_PYTHON_VERSION (default 3.12) into
#      build/gpu_wheels/ (ignored by git, so carry it to the GPU machine).
#   2. on the GPU machine:           bash bench/gpu_check.sh
#      installs those wheels offline if imports fail, then prints, for device cuda:
#        - bench/parity.py (runner vs the hand-written loop, 3 alternating rounds of the quickstart);
#        - the quickstart with the fast path (auto: bf16/fp16 AMP, channels_last, cudnn.benchmark,
#          in-memory batches on the GPU) against all switches off;
#        - experiments/vgg_transfer.yaml (its upstream vgg_pretrain.yaml runs first), and the VGG
#          pretraining again with the switches off;
#        - performance.compile=true on the quickstart (2 epochs) against eager;
#        - bench/overhead.py (the store's share of a quickstart run);
#        - several GPUs (DistributedDataParallel, NCCL, one process per GPU): bench/distributed.py,
#          1 GPU against all of them on the VGG pretraining then the VGG transfer; on a one-GPU
#          machine, one rank through torchrun (NCCL, device pinning) on the quickstart instead.
#      and (issue 14, each its own function below):
#        - peers: bench/peers.py on CUDA, the hand-written loop vs the runner vs Lightning, mixed
#          precision on every side (Lightning from the wheels fetched in step 1);
#        - cache: bench/feature_cache.py on CUDA (head-only resnet18, 10 epochs at 64x64);
#        - sharing: bench/contention.py's equivalent for one GPU: the runner's quickstart alone, then
#          two copies on the same GPU at once.
#   bash bench/gpu_check.sh --dry-run   every section on the CPU with 1 epoch and 1 round, end to end,
#      so the script cannot rot on machines without a GPU (no figure of it means anything).
#   GPU_CHECK_ALLOW_CPU=1 runs the same steps on a machine without CUDA at full length;
#   GPU_CHECK_SECTIONS="1 2 6 peers" runs only those (default: all); GPU_CHECK_EPOCHS / GPU_CHECK_ROUNDS shorten them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=build/gpu_wheels
NEEDED="sqlalchemy==2.1.9 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 torchinfo==1.8.0"
LIGHTNING="lightning lightning-utilities torchmetrics"   # for the peers section, installed by bench/peers.py

if [ "${1:-}" = "--dry-run" ]; then
    export GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_EPOCHS=${GPU_CHECK_EPOCHS:-1} GPU_CHECK_ROUNDS=${GPU_CHECK_ROUNDS:-1} GPU_CHECK_DRY_RUN=1
    shift
fi

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    "$PY" -m pip download --only-binary=:all: --no-deps --python-version "${GPU_PYTHON_VERSION:-3.12}" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" $NEEDED || exit 1
    # shellcheck disable=SC2086
    exec "$PY" -m pip download --only-binary=:all: --no-deps -d "$WHEELS/lightning" $LIGHTNING
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
IMPORTS="import click, yaml, pydantic, sqlalchemy, pluggy, torchinfo, tqdm, numpy, PIL, torch, torchvision"
if ! "$PY" -c "$IMPORTS" 2>/dev/null; then
    echo "== installing the runner's dependencies from $WHEELS (offline)"
    "$PY" -m pip install --no-index --no-deps --quiet "$WHEELS"/*.whl || {
        echo "missing dependencies and no usable wheels in $WHEELS: run 'bash bench/gpu_check.sh --fetch-wheels' where there is network"; exit 1; }
    "$PY" -c "$IMPORTS" || exit 1
fi

DEVICE=cuda
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    [ "${GPU_CHECK_ALLOW_CPU:-0}" = "1" ] || { echo "no CUDA device: this script measures the GPU fast path"; exit 1; }
    DEVICE=cpu
    echo "== dry run on the CPU (GPU_CHECK_ALLOW_CPU=1)"
fi
"$PY" -c "import torch, torchvision, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| torchvision', torchvision.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', '| bf16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else '')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
EPOCHS=${GPU_CHECK_EPOCHS:-}   # empty: each spec's own

# One `runner run` in a fresh process, timed; prints its figures. $1 label, $2 store, $3 spec, rest: --set pairs
timed_run() {
    local label=$1 db=$2 spec=$3; shift 3
    local sets=()
    for s in "$@"; do sets+=(--set "$s"); done
    [ -n "$EPOCHS" ] && sets+=(--set "training.epochs=$EPOCHS")
    local start end id
    start=$(date +%s.%N)
    id=$("$PY" -m runner run -q --db "$db" "$spec" --device "$DEVICE" ${sets[@]+"${sets[@]}"} | tail -n 1) || { echo "$label: FAILED"; return 1; }
    end=$(date +%s.%N)
    "$PY" - "$db" "$id" "$label" "$start" "$end" <<'EOF'
import json, sys
from runner.reports import run_details
from runner.store import Store
db, run_id, label, start, end = sys.argv[1:]
d = run_details(Store(db, create=False), run_id)
print(f"{label}: {float(end) - float(start):.2f} s whole process, {d['duration_s']:.2f} s in the run | run {run_id} "
      f"{d['name']} {d['status']}, {d['epochs_run']} epochs | test accuracy {d['test_accuracy']} | best val {d['best_val_accuracy']}")
print(f"    performance: {json.dumps(d['settings'].get('performance'))} | feature_cache: {d['settings'].get('feature_cache')}")
EOF
}

want() { [ -z "${GPU_CHECK_SECTIONS:-}" ] || [[ " $GPU_CHECK_SECTIONS " == *" $1 "* ]]; }
OFF=(performance.amp=off performance.channels_last=off performance.cudnn_benchmark=off performance.pin_memory=off)

if want 1; then
echo; echo "== 1. parity: runner vs a hand-written loop (quickstart, $DEVICE)"
"$PY" bench/parity.py --device "$DEVICE" --rounds "${GPU_CHECK_ROUNDS:-3}" ${EPOCHS:+--epochs "$EPOCHS"}
fi

if want 2; then
echo; echo "== 2. quickstart: fast path (auto) vs every switch off"
timed_run "quickstart auto" "$WORK/q.db" experiments/quickstart.yaml
timed_run "quickstart off " "$WORK/q.db" experiments/quickstart.yaml "${OFF[@]}"
timed_run "quickstart auto" "$WORK/q.db" experiments/quickstart.yaml
fi

if want 3; then
echo; echo "== 3. VGG: transfer (its upstream pretraining runs first), then the pretraining with the switches off"
timed_run "vgg_transfer (+ vgg_pretrain)" "$WORK/v.db" experiments/vgg_transfer.yaml
timed_run "vgg_pretrain off " "$WORK/v2.db" experiments/vgg_pretrain.yaml "${OFF[@]}"
timed_run "vgg_pretrain auto" "$WORK/v2.db" experiments/vgg_pretrain.yaml
timed_run "vgg_transfer_random" "$WORK/v.db" experiments/vgg_transfer_random.yaml
"$PY" -m runner runs --db "$WORK/v.db"
fi

if want 4; then
echo; echo "== 4. torch.compile (quickstart, 2 epochs)"
EPOCHS_SAVED=$EPOCHS; EPOCHS=2
timed_run "compile off" "$WORK/c.db" experiments/quickstart.yaml
timed_run "compile on " "$WORK/c.db" experiments/quickstart.yaml performance.compile=true
EPOCHS=$EPOCHS_SAVED
fi

if want 5; then
echo; echo "== 5. the store's share of a quickstart run (in-process)"
"$PY" bench/overhead.py ${EPOCHS:+--epochs "$EPOCHS"}
fi

if want 6; then
if [ "$DEVICE" = cuda ]; then NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())"); else NPROC=2; fi
if [ "$NPROC" -gt 1 ]; then
    echo; echo "== 6. several GPUs: 1 against $NPROC processes ($DEVICE), VGG pretraining then transfer, batch_size per process"
    "$PY" bench/distributed.py --vgg --device "$DEVICE" --nproc "$NPROC" --per-process-batch \
        --rounds "${GPU_CHECK_ROUNDS:-1}" --epochs "${EPOCHS:-0}" || echo "several GPUs: FAILED"
else
    echo; echo "== 6. one GPU: the distributed path with one rank (torchrun, NCCL, LOCAL_RANK pinning), quickstart"
    id=$("$PY" -m runner run -q --db "$WORK/d.db" experiments/quickstart.yaml --device cuda --nproc 1 \
        --set "training.epochs=${EPOCHS:-2}" | tail -n 1) || echo "one rank: FAILED"
    "$PY" -m runner show --db "$WORK/d.db" "$id" --format json | "$PY" -c \
        "import json, sys; d = json.load(sys.stdin); print(d['status'], d['device'], d['settings']['distributed'], d['test'])"
fi
fi

# ---- issue 14: peers, the feature cache and two runs on one GPU ----------------------------------

peers_on_device() {
    echo; echo "== peers: the hand-written loop vs the runner vs Lightning (quickstart, $DEVICE, mixed precision on every side)"
    local wheels=()
    [ -d "$WHEELS/lightning" ] && wheels=(--lightning-wheels "$WHEELS/lightning")
    "$PY" bench/peers.py --device "$DEVICE" --rounds "${GPU_CHECK_ROUNDS:-5}" ${EPOCHS:+--epochs "$EPOCHS"} ${wheels[@]+"${wheels[@]}"}
}

feature_cache_on_device() {
    echo; echo "== cache: the frozen-feature cache on $DEVICE (head-only resnet18)"
    if [ "${GPU_CHECK_DRY_RUN:-0}" = "1" ]; then
        "$PY" bench/feature_cache.py --device "$DEVICE" --epochs 1 --size 32
    else
        "$PY" bench/feature_cache.py --device "$DEVICE"
    fi
}

runs_sharing_the_device() {
    echo; echo "== sharing: the runner's quickstart alone, then two copies at once on one $DEVICE"
    "$PY" bench/contention.py --device "$DEVICE" --copies 1,2 --no-plain --rounds "${GPU_CHECK_ROUNDS:-1}" ${EPOCHS:+--epochs "$EPOCHS"}
}

want peers && peers_on_device
want cache && feature_cache_on_device
want sharing && runs_sharing_the_device
exit 0
