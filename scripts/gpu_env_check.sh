#!/usr/bin/env bash
# Checks here, on the CPU and without device time, that the GPU machine's Python packages plus
# the wheels of scripts/gpu_wheels.sh are enough for scripts/gpu_check.py: a virtual environment
# holding only the packages that device/KINDS.md lists for the machine (those the check can
# import) and the same versions as .whl/, then a small run of every side of the U-Net case on
# the CPU (--compile too: the compiled sides' imports). An ImportError names what to add to
# gpu_wheels.sh. About 5 minutes; needs `tileseg data fetch` first.
#
# Not the machine itself: Python 3.11 here against its 3.12, and pip's torch here against its
# 2.11 (CUDA). dask needs importlib-metadata on 3.11 only, so it is installed here alone.
#
# Usage: bash scripts/gpu_env_check.sh [VENV_DIR]   (default /tmp/tileseg-gpu-env)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/tileseg-gpu-env}
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --no-compile)
# the GPU machine's own packages (device/KINDS.md), those tileseg, MONAI and smp may import
"${pip[@]}" torch numpy pandas scipy xarray scikit-image scikit-learn tifffile timm huggingface-hub \
    safetensors pyyaml typer psutil matplotlib pillow fsspec toolz cloudpickle msgpack sortedcontainers \
    packaging jinja2 click urllib3 rich imageio lazy-loader networkx certifi attrs tqdm typing-extensions \
    importlib-metadata
# the wheels' packages, same versions, without their dependencies (as on the machine)
mapfile -t pkgs < <(sed -n '/^for p in/,/; do$/p' scripts/gpu_wheels.sh | tr -d '\\' | sed 's/for p in//; s/; do$//' | tr ' ' '\n' | grep '==')
"${pip[@]}" --no-deps "${pkgs[@]}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
results=$(mktemp)
"$venv/bin/python" tests/benchmarks/bench_unet.py --device cpu --compile --repeat-y 1 --repeat-x 1 --window 128 \
    --batch 4 --sides tileseg,tileseg_distributed,monai,monai_channels_last,monai_compiled --results "$results"
echo "ok: every side ran in $venv with the GPU machine's packages and .whl's versions"
