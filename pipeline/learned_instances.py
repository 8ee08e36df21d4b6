"""Stage-level helpers of the learned instance methods: their per-chunk kernels for
:mod:`pipeline.instances` in instance runs, and the Mask R-CNN branch of the train stage
(kept here so that :mod:`pipeline.stages` stays short). Like the stages, this mixes I/O
(the U-Net tasks read windows from the store; training saves the model) with compute.

``instances.method``:

- ``unet_watershed``: the store's image goes through the blended tiled U-Net
  (:func:`pipeline.inference.unet_probabilities`: one global window grid, so the (3, y, x)
  probabilities do not depend on the chunking); the chunk stitcher then runs
  :class:`pipeline.segment.instance_unet.WatershedKernel` on each chunk plus halo of those
  probabilities.
- ``maskrcnn``: the stitcher runs :func:`pipeline.segment.maskrcnn.maskrcnn_kernel` on each
  chunk plus halo of the model's bands. Windows overlap by the largest object extent plus
  4 px, so every object lies whole inside a window, away from the 2 px edge margin.

Halo: ``ceil(max_diameter)`` in pixels (``instances.max_diameter``, converted from µm with
the pixel size when ``units: um``), so an object touching a chunk is seen whole by that
chunk's kernel. For the watershed that is a statement about clusters of touching objects
too (see :mod:`pipeline.segment.instance_unet`); the stitcher merges pieces by IoU.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import dask.array as da

from pipeline import inference
from pipeline.config import GroundTruthConfig, InstanceConfig, TrainConfig
from pipeline.errors import ConfigError, InputError

log = logging.getLogger("tileseg")


def _diameter_px(cfg: InstanceConfig, pixel_size_um: float | None) -> float:
    if cfg.units == "px":
        return cfg.max_diameter
    if pixel_size_um is None:
        raise ConfigError("instances.units is 'um' but the store has no pixel size; give max_diameter in px "
                          "or set microscopy.pixel_size_um")  # fmt: skip
    return cfg.max_diameter / pixel_size_um


def learned_kernel(store: Path, image: da.Array, band_names: list[str], nodata: float | None, cfg: InstanceConfig,
                   pixel_size_um: float | None):  # fmt: skip
    """The kernel, its input and its halo for a learned ``cfg.method``.

    Args:
        store: the store holding ``image`` (the U-Net tasks read windows from it).
        image: the store's (band, y, x) image.

    Returns:
        ``(kernel, data, halo)``: the per-chunk kernel, the lazy (band, y, x) array it reads
        (U-Net: (3, y, x) float32 probabilities; Mask R-CNN: the model's bands), and the halo
        in pixels the kernel needs.

    Raises:
        InputError: the model is of the wrong kind, or needs bands the store lacks.
        ConfigError: a window too small for ``max_diameter``.
    """
    from pipeline.segment.unet import check_bands, describe, load_spec, resolve_device

    lc = cfg.learned
    assert lc.model is not None  # checked by InstanceConfig
    spec = load_spec(lc.model)
    band_idx = check_bands(spec, band_names)
    halo = int(math.ceil(_diameter_px(cfg, pixel_size_um)))
    device = resolve_device(lc.device)
    if cfg.method == "unet_watershed":
        from pipeline.blend import WindowGrid
        from pipeline.segment.instance_unet import INSTANCE_CLASSES, WatershedParams, watershed_kernel

        if spec.target != "instance_boundary":
            raise InputError(f"{lc.model} ({describe(spec)}) is not an instance-boundary U-Net "
                             "(train it with train.target: instance_boundary)")  # fmt: skip
        wgrid = WindowGrid.from_overlap(lc.window, lc.overlap, spec.divisor)
        probs = inference.unet_probabilities(str(store), image, band_idx, wgrid, lc.blend, str(lc.model), device,
                                             lc.batch_size, nodata, len(INSTANCE_CLASSES),
                                             strip_px=lc.strip_px, compile=lc.compile)  # fmt: skip
        probs = probs[:-1]  # drop the validity channel
        params = WatershedParams(foreground=lc.foreground, seed=lc.seed, min_seed_px=lc.min_seed_px,
                                 min_size_px=lc.min_size_px)  # fmt: skip
        return watershed_kernel(params, required_halo=halo), probs, halo
    from pipeline.segment.maskrcnn import ARCH, MaskRCNNParams, maskrcnn_kernel

    if spec.arch != ARCH:
        raise InputError(f"{lc.model} ({describe(spec)}) is not a Mask R-CNN")
    overlap = halo + 4
    if overlap >= lc.window:
        raise ConfigError(f"instances.learned.window {lc.window} px must exceed the largest object plus 4 px "
                          f"({overlap} px); use a larger window")  # fmt: skip
    params = MaskRCNNParams(window=lc.window, overlap=overlap, score=lc.score, min_size_px=lc.min_size_px,
                            nodata=nodata)  # fmt: skip
    return maskrcnn_kernel(lc.model, params, device), image[band_idx], halo


def check_instance_ground_truth(gt: GroundTruthConfig) -> None:
    """Instance training reads the ground truth as a raster of object ids, as it is.

    Raises:
        InputError: vector ground truth, or a class_map (it would turn ids into classes).
    """
    from pipeline.io import vector as vec_io

    if vec_io.is_vector(str(gt.path)):
        raise InputError(f"instance training needs a raster of instance ids (0 = background) as ground truth, "
                         f"not vector features ({gt.path})")  # fmt: skip
    if gt.class_map is not None:
        raise InputError("instance training reads object ids as they are; remove evaluate.ground_truth.class_map")


def train_maskrcnn_stage(spec, tr, va, cfg: TrainConfig, ground_truth: GroundTruthConfig, device: str, out: Path,
                         log_path: Path, progress: bool) -> Path:  # fmt: skip
    """Mask R-CNN branch of :func:`pipeline.stages.train`: chips with objects plus a few without,
    flips, AdamW; the weights of the epoch with the lowest validation loss are saved to ``out``
    (.safetensors + .json sidecar ``spec`` with the training provenance).

    Args:
        tr, va: training and validation :class:`pipeline.segment.training.Chips` whose labels
            are instance ids (-1 = unlabeled).

    Returns:
        the .safetensors path.
    """
    import time

    import torch

    from pipeline.segment.maskrcnn import select_chips, train_maskrcnn
    from pipeline.segment.unet import build_model, normalise, save_model

    t0 = time.perf_counter()
    keep = select_chips(tr.labels, cfg.maskrcnn.negatives, cfg.seed)
    log.info("Mask R-CNN: %d training chips (%d without objects), %d validation chips", len(keep),
             int((tr.labels[keep] <= 0).reshape(len(keep), -1).all(axis=1).sum()), len(va))  # fmt: skip
    torch.manual_seed(cfg.seed)
    net = build_model(spec)
    hist = train_maskrcnn(
        net, normalise(tr.images[keep], spec, tr.valid[keep]), tr.labels[keep], normalise(va.images, spec, va.valid),
        va.labels, epochs=cfg.epochs, patience=cfg.patience, batch_size=cfg.batch_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, seed=cfg.seed, device=device, rois_per_image=cfg.maskrcnn.rois_per_image,
        log_path=log_path, progress=progress,
    )  # fmt: skip
    best_val = hist.val_loss[hist.best_epoch - 1] if va.images.size else None
    spec.trained = {
        "config": cfg.model_dump(mode="json"), "ground_truth": str(ground_truth.path), "train_chips": len(keep),
        "val_chips": len(va), "epochs_run": len(hist.train_loss), "best_epoch": hist.best_epoch,
        "best_val_loss": None if best_val is None else round(best_val, 6), "device": device,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    log.info("Mask R-CNN: kept epoch %d (validation loss %s)", hist.best_epoch, best_val)
    return save_model(net.cpu(), spec, out)


__all__ = ["check_instance_ground_truth", "learned_kernel", "train_maskrcnn_stage"]
