"""Tiled vs single-piece instance segmentation on the 8 x 8 nuclei mosaic (4096 x 4096 px).

Builds the mosaic of the stardist nuclei sample (`tileseg data fetch --sample nuclei`),
runs the instance stage of config/nuclei.yaml for several chunk sizes, runs the kernel once
on the whole image with the same global threshold, and prints one JSON line per chunk size:
adjusted Rand index, object counts, whether the object-level metrics (TP/FP/FN at IoU
0.50 ... 0.95) are equal, F1 and AP at IoU 0.5, and the wall time.

    .venv/bin/python scripts/nuclei_mosaic_check.py [--rows 8 --cols 8 --chunks 512 1000 4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import xarray as xr
from sklearn.metrics import adjusted_rand_score

from pipeline import instance_stages, stages
from pipeline.config import IngestConfig, load_config
from pipeline.io.mosaic import write_mosaic
from pipeline.io.sample import fetch
from pipeline.object_metrics import instance_counts, instance_metrics

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--cols", type=int, default=8)
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 1000, 2048])
    args = ap.parse_args()
    cfg = load_config(ROOT / "config" / "nuclei.yaml").instances
    sample = fetch("nuclei", ROOT / "data" / "cache")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image_path, mask_path = write_mosaic(sample / "img2d.tif", sample / "mask2d.tif", tmp, args.rows, args.cols)
        image, mask = tifffile.imread(image_path), tifffile.imread(mask_path)
        runs = {}
        for chunk in args.chunks:
            t0 = time.perf_counter()
            store = stages.ingest_microscopy(image_path, tmp / f"c{chunk}.zarr", IngestConfig(chunk_size=chunk),
                                             progress=False)  # fmt: skip
            instance_stages.segment_instances(store, cfg, progress=False)
            ds = xr.open_zarr(store)
            runs[chunk] = (ds["instances"].values, ds["instances"].attrs["threshold"], time.perf_counter() - t0)
        threshold = runs[args.chunks[0]][1]
        kernel = dataclasses.replace(instance_stages.classical_kernel(cfg, ["nuclei"], None), threshold=threshold)
        t0 = time.perf_counter()
        single = kernel(image[None].astype(np.float32), np.ones(image.shape, bool))
        t_single = time.perf_counter() - t0
        ref = instance_metrics(instance_counts(mask, single))
        print(json.dumps({"case": "single piece", "shape": list(image.shape), "objects": int(len(np.unique(single)) - 1),
                          "f1_at_0.5": ref.at(0.5)["f1"], "ap_at_0.5": ref.at(0.5)["ap"], "mean_ap": ref.mean_ap,
                          "seconds": round(t_single, 2)}))  # fmt: skip
        for chunk, (labels, thr, secs) in runs.items():
            m = instance_metrics(instance_counts(mask, labels))
            same = bool(np.array_equal(m.tp, ref.tp) and np.array_equal(m.fp, ref.fp) and np.array_equal(m.fn, ref.fn))
            print(json.dumps({
                "case": f"chunks {chunk} px", "threshold_equal": thr == threshold,
                "ari": round(float(adjusted_rand_score(single.ravel(), labels.ravel())), 6),
                "objects": int(len(np.unique(labels)) - 1), "dtype": str(labels.dtype), "metrics_equal": same,
                "f1_at_0.5": m.at(0.5)["f1"], "ap_at_0.5": m.at(0.5)["ap"], "seconds": round(secs, 2),
            }))  # fmt: skip


if __name__ == "__main__":
    main()
