"""GPU check (issue 7): the U-Net case of ``tests/benchmarks/bench_unet.py`` on a CUDA device.

One run, same GPU, same model, window, overlap, batch, Gaussian weights and window placement:

- ``tileseg``: the segment stage disk to disk (zarr in, zarr labels + COG out; bf16 autocast,
  channels_last, ``segment.unet.compile`` compiled before the clock, window sums made on the
  GPU), Dask's threaded scheduler;
- ``tileseg_distributed``: the same on the LocalCluster ``tileseg run`` starts on a GPU
  machine (one worker process per GPU, pinned to it, U-Net tasks asking for ``GPU=1``);
- ``monai``, ``monai_channels_last``, ``monai_compiled``: MONAI's ``sliding_window_inference``
  with the image already in GPU memory; plain, channels_last, and channels_last +
  ``torch.compile`` (compiled before the clock): MONAI's best in-memory figure.

It prints (and appends to ``tests/benchmarks/results.jsonl``) one JSON line with each side's
megapixels per second, the speed-up of each tileseg side over each MONAI side, the label
agreement (every valid pixel; MONAI's run is a single piece in memory) and
``goal_met_<side>``: at least as fast as MONAI's best with >= 99.9 % agreement.

Usage, from the repository root of a machine with a GPU, after ``tileseg data fetch``:

    python scripts/gpu_check.py [--repeat-y 8 --repeat-x 4] [--window 512] [--batch 16]

On this project's lent GPU machine (Python 3.12 with torch but without dask, zarr, rasterio,
MONAI, ...): ``scripts/gpu_wheels.sh`` here first, then the device call it describes.

Exits with an error line when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat-y", default="8", help="scene tiles down (768 px each)")
    ap.add_argument("--repeat-x", default="4", help="scene tiles across (1536 px each)")
    ap.add_argument("--window", default="512")
    ap.add_argument("--overlap", default="0.25")
    ap.add_argument("--batch", default="16")
    ap.add_argument("--sides", default="tileseg,tileseg_distributed,monai,monai_channels_last,monai_compiled")
    ap.add_argument("--results", default="tests/benchmarks/results.jsonl", help="JSON lines file to append to")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device visible; run this on a GPU machine", file=sys.stderr)
        return 1
    from tests.benchmarks import bench_unet

    bench_unet.main(["--device", "cuda", "--compile", "--repeat-y", args.repeat_y, "--repeat-x", args.repeat_x,
                     "--window", args.window, "--overlap", args.overlap, "--batch", args.batch,
                     "--sides", args.sides, "--results", args.results])  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
