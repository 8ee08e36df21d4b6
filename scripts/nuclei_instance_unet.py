"""Instance U-Net on the StarDist nuclei sample: train on the TOP half, object F1 on the BOTTOM half.

Data: ``img2d.tif`` (y, x) and ``mask2d.tif`` (y, x) instance ids (0 = background) in
``--data`` (default ``data/cache/stardist-nuclei``; fetched by the microscopy tooling, not here).

- Training: the top half's rows ``[0, H/2 - V)`` give training chips (``--tile`` px every
  ``--stride`` px), rows ``[H/2 - V, H/2)`` validation chips for early stopping
  (``V = --val-rows``). The instance ids become background / interior / boundary targets
  (:func:`pipeline.segment.instance_unet.boundary_targets`) on the whole strip before it is
  cut into chips; the model trains through :func:`pipeline.segment.training.train`, the
  same loop as ``tileseg train``.
- Scoring: the bottom half alone (rows ``[H/2, H)``, never seen in training) goes through
  the blended tiled inference (:func:`pipeline.blend.blend_region`, Hann weights) and the
  watershed kernel (:func:`pipeline.segment.instance_unet.watershed_instances`). Predicted
  objects are matched one-to-one to ground-truth objects greedily by decreasing IoU, a pair
  counting when IoU > 0.5 (at that threshold the match is unique anyway); F1 = 2 TP /
  (2 TP + FP + FN). For context the same score is given for connected components of the
  predicted foreground without the watershed, for the classical instance method with
  ``config/nuclei.yaml``'s hand-chosen parameters, and for Otsu's threshold of the image
  plus connected components.

Usage (from the repository root; the committed ``models/nuclei-unet.*`` came from exactly this,
about 1-2 minutes on 2 CPU cores):

    .venv/bin/python scripts/nuclei_instance_unet.py --out models/nuclei-unet.safetensors

Defaults: U-Net with a ResNet-18 encoder of depth 2 (0.8 MB), 64 px chips every 32 px,
cross-entropy (inverse-sqrt class weights) + Dice, AdamW 3e-3 with a cosine schedule, 80
epochs, the epoch with the best validation mIoU kept; inference windows of 128 px, overlap
0.25; the watershed's default parameters (not tuned on the scored half).

Prints the scores and writes ``outputs/nuclei/results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage


#: The band name tileseg's microscopy ingest gives the image's one channel, so the model runs
#: on `tileseg run config/nuclei.yaml --set instances.method=unet_watershed ...` stores.
BAND = "ch0"


def match_f1(gt: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> dict:
    """Greedy one-to-one matching of objects by decreasing IoU (pairs with IoU > threshold).

    Args:
        gt, pred: (y, x) integer instance ids, 0 = background.

    Returns:
        tp, fp, fn, precision, recall, f1 and the mean IoU of the matched pairs.
    """
    g, p = gt.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    g_ids, g_inv = np.unique(g, return_inverse=True)
    p_ids, p_inv = np.unique(p, return_inverse=True)
    inter = np.zeros((len(g_ids), len(p_ids)), np.int64)
    np.add.at(inter, (g_inv, p_inv), 1)
    g_area, p_area = inter.sum(axis=1), inter.sum(axis=0)
    gi, pi = np.nonzero(inter)
    keep = (g_ids[gi] > 0) & (p_ids[pi] > 0)
    gi, pi = gi[keep], pi[keep]
    iou = inter[gi, pi] / (g_area[gi] + p_area[pi] - inter[gi, pi])
    used_g, used_p, ious = set(), set(), []
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] <= threshold:
            break
        if gi[k] in used_g or pi[k] in used_p:
            continue
        used_g.add(gi[k])
        used_p.add(pi[k])
        ious.append(float(iou[k]))
    n_gt, n_pred, tp = int((g_ids > 0).sum()), int((p_ids > 0).sum()), len(ious)
    fp, fn = n_pred - tp, n_gt - tp
    return {
        "gt_objects": n_gt, "pred_objects": n_pred, "tp": tp, "fp": fp, "fn": fn,
        "precision": tp / n_pred if n_pred else 0.0, "recall": tp / n_gt if n_gt else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0,
        "mean_matched_iou": float(np.mean(ious)) if ious else 0.0,
    }  # fmt: skip


def _chips(img: np.ndarray, target: np.ndarray, tile: int, stride: int):
    from pipeline.segment.training import Chips

    h, w = target.shape
    origins = [(r, c) for r in range(0, h - tile + 1, stride) for c in range(0, w - tile + 1, stride)]
    return Chips(
        np.stack([img[None, r : r + tile, c : c + tile] for r, c in origins]).astype(np.float32),
        np.stack([target[r : r + tile, c : c + tile] for r, c in origins]).astype(np.int64),
        np.ones((len(origins), tile, tile), bool),
    )


def _classical(image: np.ndarray) -> np.ndarray:
    """The classical instance kernel with ``config/nuclei.yaml``'s parameters (chosen by hand
    on the whole image) and the Otsu threshold of this image's smoothed signal."""
    import dask.array as da

    from pipeline.config import load_config
    from pipeline.instance_stages import classical_kernel
    from pipeline.instances import with_global_otsu

    cfg = load_config(Path("config/nuclei.yaml")).instances
    img, valid = image[None].astype(np.float32), np.ones(image.shape, bool)
    kernel = with_global_otsu(da.from_array(img), da.from_array(valid), classical_kernel(cfg, [BAND], None))
    return kernel(img, valid)


def main() -> None:
    from pipeline import __version__
    from pipeline.blend import WindowGrid, blend_region, window_weights
    from pipeline.segment import training
    from pipeline.segment.instance_unet import INSTANCE_CLASSES, WatershedParams, boundary_targets, watershed_instances
    from pipeline.segment.unet import ModelSpec, build_model, normalise, predict_probabilities, save_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/cache/stardist-nuclei"))
    ap.add_argument("--out", type=Path, default=Path("outputs/nuclei/nuclei-unet.safetensors"))
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--stride", type=int, default=32)
    ap.add_argument("--val-rows", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--patience", type=int, default=80)
    ap.add_argument("--encoder-depth", type=int, default=2)
    ap.add_argument("--decoder", type=int, nargs="+", default=[32, 16])
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    ap.add_argument("--weighting", choices=["none", "inverse_sqrt"], default="inverse_sqrt")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    img = np.squeeze(tifffile.imread(args.data / "img2d.tif")).astype(np.float32)
    gt = np.squeeze(tifffile.imread(args.data / "mask2d.tif")).astype(np.int64)
    if img.ndim != 2 or img.shape != gt.shape:
        raise SystemExit(f"expected one (y, x) image and mask of the same shape, got {img.shape} and {gt.shape}")
    h, w = img.shape
    half = h // 2
    print(f"image {w} x {h} px, {len(np.unique(gt)) - 1} nuclei; train rows 0-{half - args.val_rows - 1}, "
          f"validate rows {half - args.val_rows}-{half - 1}, score rows {half}-{h - 1}")  # fmt: skip

    top_target = boundary_targets(gt[:half])  # on the whole strip: objects cut by chips keep their outlines
    split = half - args.val_rows
    tr = _chips(img[:split], top_target[:split], args.tile, args.stride)
    va = _chips(img[split:half], top_target[split:half], args.tile, args.tile)
    mean, std = training.band_statistics(tr)
    spec = ModelSpec(arch="Unet", encoder=args.encoder, encoder_depth=args.encoder_depth, decoder_channels=args.decoder,
                     bands=[BAND], mean=mean, std=std, classes=INSTANCE_CLASSES, tile_size=args.tile,
                     target="instance_boundary", tileseg_version=__version__)  # fmt: skip
    torch.manual_seed(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".log.jsonl")
    log_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    result = training.train(
        build_model(spec), lambda im, v: normalise(im, spec, v), tr, va, len(INSTANCE_CLASSES), epochs=args.epochs,
        patience=args.patience, batch_size=8, lr=args.lr, weight_decay=1e-4, loss="ce+dice", weighting=args.weighting,
        schedule=args.schedule, seed=args.seed,
        device="cpu", log_path=log_path,
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    net = result.net.eval()

    bottom = img[half:]
    wgrid = WindowGrid.from_overlap(args.window, 0.25, spec.divisor)
    probs = blend_region(
        lambda r0, r1, c0, c1: bottom[None, r0:r1, c0:c1], bottom.shape, (0, bottom.shape[0]), (0, bottom.shape[1]),
        wgrid, window_weights(wgrid.window, "hann"), lambda b: predict_probabilities(net, normalise(b, spec), "cpu"),
        len(INSTANCE_CLASSES), 8,
    ).astype(np.float32)  # fmt: skip
    valid = np.ones(bottom.shape, bool)
    params = WatershedParams()
    pred = watershed_instances(probs, valid, params)
    gt_bottom = gt[half:]
    fg_components = ndimage.label(probs[1] + probs[2] > params.foreground)[0]
    from skimage.filters import threshold_otsu

    otsu = ndimage.label(bottom > threshold_otsu(bottom))[0]
    scores = {
        "unet_watershed": match_f1(gt_bottom, pred),
        "unet_foreground_components": match_f1(gt_bottom, fg_components),
        "classical_nuclei_yaml": match_f1(gt_bottom, _classical(bottom)),
        "otsu_components": match_f1(gt_bottom, otsu),
    }
    spec.trained = {
        "script": "scripts/nuclei_instance_unet.py", "args": {k: str(v) for k, v in vars(args).items()},
        "train_chips": len(tr), "val_chips": len(va), "epochs_run": len(result.history),
        "best_epoch": result.best_epoch, "best_val_miou": round(result.best_val_miou, 6),
        "bottom_half_object_f1_iou50": round(scores["unet_watershed"]["f1"], 4), "seconds": round(train_s, 1),
    }  # fmt: skip
    save_model(net.cpu(), spec, args.out)
    out_dir = Path("outputs/nuclei")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"scores": scores, "trained": spec.trained}, indent=2) + "\n")
    print(f"trained {len(result.history)} epochs in {train_s:.0f} s (best validation mIoU "
          f"{result.best_val_miou:.3f} at epoch {result.best_epoch}); model: {args.out}")  # fmt: skip
    print(f"{'method (bottom half)':<30} {'GT':>5} {'pred':>5} {'TP':>5} {'prec.':>7} {'recall':>7} {'F1@0.5':>7}")
    for name, s in scores.items():
        print(f"{name:<30} {s['gt_objects']:>5} {s['pred_objects']:>5} {s['tp']:>5} {s['precision']:>7.3f} "
              f"{s['recall']:>7.3f} {s['f1']:>7.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
