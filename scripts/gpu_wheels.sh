#!/usr/bin/env bash
# Wheels that the GPU machine lacks for scripts/gpu_check.py, for its Python 3.12 (x86-64),
# downloaded into .whl/ (git-ignored; about 50 MiB, under the 64 MiB a device call carries with
# the repository and data/cache). The machine has torch, numpy, xarray, scikit-image, tifffile,
# timm and the other common packages already (see the tool library's device/KINDS.md).
#
# Then, with the device tool (one call; about 3 minutes on a warm H200 at the default size, plus
# the compilations of the compiled sides, tileseg and monai_compiled, each before its clock):
#   carry: [".whl", "data/cache"]
#   command: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
#            --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
#            PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --results $OUT/results.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for p in dask==2026.8.0 distributed==2026.8.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 \
         google-crc32c==1.9.0 rasterio==1.4.4 affine==3.0.1 click-plugins==1.1.1.2 cligj==0.7.2 \
         pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
         tornado==6.6.1 locket==1.0.0 partd==1.4.2 zict==3.0.0 tblib==3.2.2 \
         segmentation-models-pytorch==0.6.0 monai==1.6.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$p"
done
du -sh .whl
