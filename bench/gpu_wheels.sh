#!/usr/bin/env bash
# Fetch, where pip reaches PyPI, the wheels bench/gpu_check.sh needs on a GPU machine
# that has CUDA torch but nothing else of protonet's (and no network): protobuf, lmdb,
# h5py, OpenCV (headless), tqdm and pytest, for that machine's Python (default 3.12),
# into .whl/ (git ignores it; carry it to the machine).
#
#     bash bench/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
platforms=()
for n in 17 27 28 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp "${platforms[@]}" -d .whl \
    "protobuf==$(python3 -c 'import google.protobuf as p; print(p.__version__)')" \
    "lmdb>=1.4" "h5py>=3.8" "opencv-python-headless>=4.8,<4.11" "tqdm>=4.60" \
    "pytest>=7" "pluggy>=1.5" "iniconfig>=2" "packaging>=24" "pygments>=2.15"
du -sh .whl && ls .whl
