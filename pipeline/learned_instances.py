"""The learned instance methods as per-chunk kernels for :mod:`pipeline.instances` (Dask glue;
no file I/O beyond what the U-Net tasks read from the store).

``instances.method``:

- ``unet_watershed``: the store's image goes through the blended tiled U-Net
  (:func:`pipeline.apply.unet_probabilities`: one global window grid, so the (3, y, x)
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

import math
from pathlib import Path

import dask.array as da

from pipeline import apply
from pipeline.config import InstanceConfig
from pipeline.errors import ConfigError, InputError


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
        probs = apply.unet_probabilities(str(store), image, band_idx, wgrid, lc.blend, str(lc.model), device,
                                         lc.batch_size, nodata, len(INSTANCE_CLASSES))  # fmt: skip
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
    params = MaskRCNNParams(window=lc.window, overlap=overlap, score=lc.score, min_size_px=lc.min_size_px)
    return maskrcnn_kernel(lc.model, params, device), image[band_idx], halo


__all__ = ["learned_kernel"]
