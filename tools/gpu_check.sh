#!/usr/bin/env bash
# The checks that need a GPU, in one go, each logged into a folder (issue 14):
#   1. build the extension with CUDA kernels (in place, like `python setup.py build_ext --inplace`);
#   2. the CUDA tests (ops kernels against the CPU ones, the DataParallel on 2 GPUs when there are 2);
#   3. a 2-process DDP smoke run of tools/train_net_step.py under torchrun (NCCL, AMP on), then its distributed
#      test_net.py; NCCL cannot put two ranks on one GPU, so with a single GPU the run is 1 process on the GPU
#      plus a 2-process gloo run on the CPU for the DDP mechanics;
#   4. the benchmarks: ops, R-50-FPN Mask R-CNN in float32 and AMP beside torchvision's, and the
#      1-process / DataParallel / DDP training images/s.
#
#   tools/gpu_check.sh [LOG_DIR]        (default: gpu_check_logs/<UTC date-time>)
#
# Run from the repository root. Every step runs even if an earlier one failed; the summary lists each step's
# status and the script exits non-zero if any failed. Steps 3-4 need the shapes dataset generator only.
set -u -o pipefail

LOG_DIR=${1:-gpu_check_logs/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
export PYTHONPATH="$PWD/lib${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
FAILED=()

step() {  # step NAME COMMAND...: run COMMAND, output to LOG_DIR/NAME.log, record the status
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$LOG_DIR/summary.txt"
    local start=$SECONDS
    if "$@" >"$LOG_DIR/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)" | tee -a "$LOG_DIR/summary.txt"
    else
        echo "   FAILED with status $? ($((SECONDS - start)) s): see $LOG_DIR/$name.log" | tee -a "$LOG_DIR/summary.txt"
        FAILED+=("$name")
    fi
}

if ! command -v nvidia-smi >/dev/null || ! $PYTHON -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA GPU visible to torch: nothing to check here" | tee "$LOG_DIR/summary.txt"
    exit 2
fi
GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")

step environment bash -c "nvidia-smi; nvcc --version; $PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'"
step build env FORCE_CUDA=1 $PYTHON setup.py build_ext --inplace
step cuda_tests $PYTHON -m pytest -q -rs tests/ops tests/test_cuda_compile.py tests/engine/test_parallel.py

DATA="$LOG_DIR/shapes"
step shapes_dataset $PYTHON -c "from pydetectron.data.shapes import generate_split; generate_split('$DATA', 'train', 32, seed=1); generate_split('$DATA', 'val', 16, seed=2)"
REGISTER=(--register "gpu_shapes_train:$DATA/train:$DATA/annotations/instances_train.json"
          --register "gpu_shapes_val:$DATA/val:$DATA/annotations/instances_val.json")
CFG=configs/getting_started/e2e_mask_rcnn_R-18-FPN_shapes.yaml
SMOKE=(--cfg "$CFG" "${REGISTER[@]}" --set TRAIN.DATASETS "('gpu_shapes_train',)" TEST.DATASETS "('gpu_shapes_val',)"
       SOLVER.MAX_ITER 40 TRAIN.SNAPSHOT_ITERS 20 TEST.EVAL_PERIOD 20 MODEL.NUM_CLASSES 4)
PROCS=$((GPUS >= 2 ? 2 : 1))
step ddp_train $PYTHON -m torch.distributed.run --standalone --nproc_per_node "$PROCS" tools/train_net_step.py \
    "${SMOKE[@]}" --bs "$((2 * PROCS))" --amp --disp_interval 5 --output_dir "$LOG_DIR/ddp_run"
step ddp_test $PYTHON -m torch.distributed.run --standalone --nproc_per_node "$PROCS" tools/test_net.py \
    --cfg "$CFG" "${REGISTER[@]}" --dataset gpu_shapes_val --load_ckpt "$LOG_DIR/ddp_run/ckpt/model_final.pth" \
    --amp --output_dir "$LOG_DIR/ddp_test" --set MODEL.NUM_CLASSES 4
if [ "$PROCS" -ge 2 ]; then
    step spawn_train $PYTHON tools/train_net_step.py "${SMOKE[@]}" --num-gpus 2 --bs 4 --disp_interval 5 \
        --output_dir "$LOG_DIR/spawn_run" --no_save
else
    step gloo_train $PYTHON tools/train_net_step.py "${SMOKE[@]}" --num-gpus 2 --no_cuda --bs 4 --disp_interval 5 \
        --output_dir "$LOG_DIR/gloo_run" --no_save
fi

step bench_ops $PYTHON tools/benchmark_ops.py --device cuda
step bench_model_fp32 $PYTHON tools/benchmark_model.py --device cuda --repeats 5
step bench_model_amp $PYTHON tools/benchmark_model.py --device cuda --repeats 5 --amp
step bench_distributed $PYTHON tools/benchmark_distributed.py --steps 20 --images 4 --scale 400

echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "all steps passed; logs in $LOG_DIR" | tee -a "$LOG_DIR/summary.txt"
else
    echo "failed steps: ${FAILED[*]}; logs in $LOG_DIR" | tee -a "$LOG_DIR/summary.txt"
    exit 1
fi
