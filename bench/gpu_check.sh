#!/usr/bin/env bash
# Issue 15's GPU checks in one call of about 6 minutes: the CUDA tests, ResNet-50 and
# GoogLeNet training from a JPEG LMDB against in-memory batches in fp32, bf16 and
# fp16, and the LeNet solver on the GPU. Each step has its own time limit, so one
# that hangs costs its slot, not the run; logs go to $OUT (or ./gpu-check).
#
# On a machine whose python3 has CUDA torch but not protonet's other dependencies,
# fetch them first where pip works (bench/gpu_wheels.sh writes .whl/) and carry .whl:
#
#     bash bench/gpu_check.sh            # on the GPU machine, from the repo root
#     GPU_CHECK_CPU=1 bash bench/gpu_check.sh   # the same steps, tiny, on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "${GPU_CHECK_CPU:-}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/protonet-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/protonet-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "${GPU_CHECK_CPU:-}" = 1 ]; then
    gpu=(); batch=4; iterations=2; nets=lenet; lenet_iterations=50
else
    gpu=(--gpu 0); batch=64; iterations=20; nets=resnet50,googlenet; lenet_iterations=1000
fi

step() {    # step NAME SECONDS COMMAND...: run it with a limit, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status"
    echo "$name $status" >>"$OUT/status.txt"
}

: >"$OUT/status.txt"
step environment 30 python3 -c "
import torch, protonet, google.protobuf, lmdb, h5py, cv2
print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')
print('protobuf', google.protobuf.__version__, 'lmdb', lmdb.version(), 'h5py', h5py.__version__,
      'opencv', cv2.__version__)"
# Every test file with a CUDA branch (found, not listed, so new ones are included).
mapfile -t cuda_tests < <(grep -l cuda tests/test_*.py tests/layers/test_*.py)
step tests 150 python3 -m pytest -q -p no:cacheprovider "${cuda_tests[@]}"
for precision in fp32 bf16 fp16; do
    step "train_data_$precision" 80 python3 bench/bench_train_data.py "${gpu[@]}" \
        --nets "$nets" --batch "$batch" --iterations "$iterations" --records 256 \
        --precision "$precision" --workdir /tmp/protonet-lmdb
done
step lenet_solver 60 python3 bench/bench_lenet_train.py "${gpu[@]}" \
    --iterations "$lenet_iterations" --workdir /tmp/protonet-lenet
echo "== steps and exit codes:"; cat "$OUT/status.txt"
! grep -qv ' 0$' "$OUT/status.txt"
