"""Config models of microscopy inputs and instance segmentation (part of the run config,
:class:`pipeline.config.RunConfig`; import them from :mod:`pipeline.config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, model_validator

from pipeline.config_base import _Model


class InstanceEvaluateConfig(_Model):
    """Object-level evaluation of instance labels against a ground-truth instance mask."""

    ground_truth: Path = Field(description="Instance-id raster (TIFF, OME-TIFF, GeoTIFF, zarr): 0 = background.")
    nodata: int | None = Field(default=None, description="Ground-truth value meaning 'unlabeled' (left out).")


class MicroscopyConfig(_Model):
    """Options for microscopy inputs (TIFF, BigTIFF, OME-TIFF, zarr, OME-Zarr); see
    :mod:`pipeline.io.microscopy`. Sizes in micrometres."""

    channels: list[str | int] | None = Field(
        default=None,
        description="Channels to ingest, by name (OME channel names) or 0-based index, in this order. Default: all.",
    )
    pixel_size_um: tuple[PositiveFloat, PositiveFloat] | PositiveFloat | None = Field(
        default=None,
        description="Physical pixel size in micrometres, (y, x) or one value for square pixels, overriding the "
        "file's metadata. Default: from OME / NGFF metadata, else unknown.",
    )
    axes: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z]+$",
        description="Override of the stored axes, one tifffile letter per dimension (e.g. CYX, YXS). "
        "Default: the file's.",
    )

    def pixel_size_yx(self) -> tuple[float, float] | None:
        """The override as (y, x) micrometres, or None."""
        p = self.pixel_size_um
        return None if p is None else (float(p), float(p)) if isinstance(p, int | float) else (float(p[0]), float(p[1]))


class LearnedInstanceConfig(_Model):
    """Options of the learned instance methods (``instances.method``: ``unet_watershed`` or
    ``maskrcnn``; see :mod:`pipeline.learned_instances`). Sizes in pixels."""

    model: Path | None = Field(default=None, description="Saved model: NAME.safetensors with NAME.json beside it.")
    window: int = Field(default=256, ge=32, description="Inference window edge, pixels.")
    overlap: float = Field(default=0.25, ge=0.0, le=0.875, description="U-Net window overlap (fraction of the window).")
    blend: Literal["hann", "gaussian"] = "hann"
    batch_size: int = Field(default=8, ge=1)
    strip_px: int | None = Field(
        default=16384,
        ge=256,
        description="U-Net: rasters wider than this are segmented in vertical strips of at most this many pixels, "
        "one after the other, so that memory does not grow with the width (as segment.unet.strip_px). "
        "null: one strip, the whole width.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(default=False, description="U-Net: torch.compile the model (as segment.unet.compile).")
    foreground: float = Field(default=0.5, ge=0, lt=1, description="U-Net: P(interior) + P(boundary) above this.")
    seed: float = Field(default=0.5, ge=0, lt=1, description="U-Net: watershed markers where P(interior) > this.")
    min_seed_px: int = Field(default=4, ge=1, description="U-Net: smaller markers are dropped.")
    score: float = Field(default=0.5, ge=0, le=1, description="Mask R-CNN: detections scoring at or below are dropped.")
    min_size_px: int = Field(default=8, ge=1, description="Objects (pieces) with fewer pixels are dropped.")


class InstanceConfig(_Model):
    """Instance segmentation: an id per object, objects whole across chunk borders.

    Lengths are in ``units``: pixels, or micrometres (``um``) converted with the store's
    ``pixel_size_um`` (microscopy inputs; the mean of y and x for slightly anisotropic
    pixels). ``min_size`` is an area (px² or µm²). See :mod:`pipeline.segment.instances`
    and :mod:`pipeline.instances`.
    """

    method: Literal["classical", "unet_watershed", "maskrcnn"] = Field(
        default="classical",
        description="Per-chunk instance kernel: classical, a U-Net boundary model + watershed, or a Mask R-CNN "
        "(the learned ones use `learned` and `max_diameter`).",
    )
    learned: LearnedInstanceConfig = LearnedInstanceConfig()
    bands: list[str] | None = Field(default=None, description="Bands averaged into the signal. Default: the first.")
    threshold: float | None = Field(
        default=None, description="Foreground threshold on the smoothed signal. None: Otsu of the whole image."
    )
    polarity: Literal["bright", "dark"] = Field(default="bright", description="Bright objects on dark, or dark on bright.")
    sigma: float = Field(default=1.0, ge=0, description="Gaussian smoothing before thresholding (units).")
    max_diameter: float = Field(default=30.0, gt=0, description="Largest object extent (units); sets the halo.")
    min_distance: float = Field(default=4.0, gt=0, description="Smallest distance between two object centres (units).")
    min_size: float = Field(default=0.0, ge=0, description="Objects with a smaller area are removed (units²).")
    fill_holes: bool = True
    split: Literal["distance", "intensity"] = Field(
        default="distance", description="Watershed of the distance transform, or of the inverted signal."
    )
    footprint: Literal["square", "disk"] = "square"
    compactness: float = Field(default=0.0, ge=0)
    edges: bool = Field(default=False, description="Remove Canny edges of the signal from the foreground.")
    units: Literal["px", "um"] = "px"
    halo: int | None = Field(
        default=None, ge=0, description="Pixels of context per chunk side. Default (and minimum): the kernel's need."
    )
    merge_iou: float = Field(
        default=0.5, ge=0.5, lt=1.0, description="Pieces in neighbouring chunks merge above this IoU in the halo."
    )
    ome_zarr: bool | None = Field(
        default=None, description="Write <output_dir>/instances.ome.zarr. Default: for microscopy inputs."
    )
    label_tiff: bool = Field(default=False, description="Also write a plain tiled TIFF of the instance ids.")
    thing_classes: list[str] | None = Field(
        default=None,
        description="Panoptic runs (a semantic `segment` too): the classes whose pixels carry instance ids "
        "(countable objects, e.g. buildings); the others are 'stuff' (instance 0). Default: every class.",
    )

    @model_validator(mode="after")
    def _learned_model(self) -> InstanceConfig:
        if self.method != "classical" and self.learned.model is None:
            raise ValueError(f"instances.method {self.method} needs instances.learned.model")
        return self
