"""Typed run configuration (pydantic v2), validated once at the edge.

A run config is one :class:`RunConfig`. It is loaded from YAML
(:func:`load_config`), optionally with ``key.path=value`` overrides (the CLI's
``--set``), and passed whole to the Prefect flow, whose UI renders it as a form.
Unknown keys are refused everywhere (``extra="forbid"``) so that a typo never
silently falls back to a default.

Units: every size named ``*_px`` or ``chunk_size`` is in pixels; bounding boxes
and resolutions are in map units of the raster's CRS (metres for UTM).
Relative paths are resolved against the current working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.config_base import _Model
from pipeline.config_instances import (  # noqa: F401  (re-exported: every config model is importable from here)
    InstanceConfig,
    InstanceEvaluateConfig,
    LearnedInstanceConfig,
    MicroscopyConfig,
)
from pipeline.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

#: Label value written where no class could be assigned (nodata input, outside
#: the raster). Chosen as the top of uint8 so that 0 stays a real class id.
LABEL_NODATA = 255

#: Value of rasterized ground truth for pixels without a label (no polygon,
#: or a polygon whose class is not in ``classes``).
GT_NODATA = 255

Resampling = Literal["nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode"]


class ClassInfo(_Model):
    """One semantic class. Its id is its position in :attr:`RunConfig.classes`."""

    name: str
    color: str | None = Field(
        default=None,
        description="Colour for the COG colour table, '#rrggbb'. Default: a fixed palette.",
        pattern=r"^#[0-9a-fA-F]{6}$",
    )


class BBox(_Model):
    """Axis-aligned box in map units of the raster's CRS: (xmin, ymin, xmax, ymax).

    A pixel belongs to the box when its centre lies inside it
    (xmin <= x < xmax and ymin <= y < ymax), so adjacent boxes never share a pixel.
    """

    xmin: float
    ymin: float
    xmax: float
    ymax: float

    @model_validator(mode="after")
    def _ordered(self) -> BBox:
        if not (self.xmin < self.xmax and self.ymin < self.ymax):
            raise ValueError("bbox needs xmin < xmax and ymin < ymax")
        return self


class GridConfig(_Model):
    """The target grid that all input bands are resampled onto during ingest."""

    reference: str | None = Field(
        default=None,
        description="Band whose grid (CRS, transform, shape) is the target. Default: the finest-resolution band.",
    )
    resolution: float | None = Field(
        default=None, gt=0, description="Override of the pixel size, in map units, keeping the reference's extent."
    )
    resampling: Resampling = Field(
        default="bilinear", description="How bands on another grid are resampled (GDAL warp resampling)."
    )


class IngestConfig(_Model):
    """Options of the ingest stage (rasters -> chunked zarr store)."""

    chunk_size: int = Field(default=1024, ge=16, le=16384, description="Chunk edge T in pixels; chunks are (band, T, T).")
    band_names: list[str] | None = Field(
        default=None, description="Names of the input bands in order. Default: from descriptions or file names."
    )
    nodata: float | None = Field(
        default=None, description="Nodata value of the input, overriding what the files say (None: use the files')."
    )
    grid: GridConfig = GridConfig()
    allow_no_crs: bool = Field(
        default=False,
        description="Ingest rasters without a CRS in pixel coordinates (their transform's units). "
        "Off: such rasters are refused. Evaluation against vector ground truth needs a CRS.",
    )


class ThresholdConfig(_Model):
    """Thresholding of one band or a spectral index.

    ``labels = 1`` where ``expression > threshold``, else ``0``.
    """

    expression: str = Field(
        default="(B03 - B08) / (B03 + B08)",
        description="A band name or an arithmetic expression over band names (+ - * / ** and parentheses).",
    )
    value: float | None = Field(default=None, allow_inf_nan=False,
                                description="Fixed threshold. None: Otsu on the whole-raster histogram.")  # fmt: skip
    bins: int = Field(
        default=1024, ge=16, le=1_000_000,
        description="Histogram bins for Otsu. A bare 8- or 16-bit integer band uses one bin per value instead.",
    )  # fmt: skip


class KMeansConfig(_Model):
    """K-means clustering fitted once on a seeded sample of the whole raster."""

    bands: list[str] | None = Field(default=None, description="Bands used as features. Default: all bands.")
    n_clusters: int = Field(default=8, ge=2, le=254)
    sample_size: int = Field(default=100_000, ge=100, description="Pixels sampled (before dropping nodata).")
    seed: int = 0
    map_to_classes: bool = Field(
        default=False,
        description="Map cluster ids to ground-truth classes by majority vote inside `train_area`.",
    )
    train_area: BBox | None = Field(default=None, description="Area for the majority vote (map units).")


class UNetConfig(_Model):
    """Tiled U-Net (or FCN) inference with overlap blending on one global window grid."""

    model: Path | None = Field(default=None, description="Saved model: NAME.safetensors with NAME.json beside it.")
    window: int = Field(default=256, ge=16, le=8192, description="Inference window edge W, pixels.")
    overlap: float = Field(
        default=0.25, ge=0.0, le=0.875, description="Window overlap; stride S = round(W*(1-overlap)) >= W/8."
    )
    blend: Literal["hann", "gaussian"] = Field(default="hann", description="Window weighting for blending.")
    placement: Literal["centred", "edge"] = Field(
        default="centred",
        description="Window grid: `centred` (first window starts (W-S)/2 px before the raster, reflected "
        "context at its edges) or `edge` (MONAI's sliding window: first window at 0, last flush with the "
        "far edge, S = int(W*(1-overlap))).",
    )
    batch_size: int = Field(default=8, ge=1, le=4096, description="Windows per model call.")
    strip_px: int | None = Field(
        default=16384,
        ge=256,
        description="Rasters wider than this are computed in vertical strips of at most this many pixels, "
        "one after the other, so that memory does not grow with the width; the window blocks on strip borders "
        "run once per strip (README 'Performance'). null: one strip, the whole width.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(
        default=False,
        description="torch.compile the model, once per process: the first batch waits for the compilation "
        "(about 25 s on a 2-core CPU; needs a C++ compiler on a CPU, Triton on a GPU), then each batch runs "
        "faster (1.38x for the sample model on one CPU thread; README 'Performance'). For long runs.",
    )
    probabilities: bool = Field(default=False, description="Also write `probabilities` (class, y, x) float16.")


class SegmentConfig(_Model):
    """Options of the segment stage."""

    method: Literal["threshold", "kmeans", "unet", "none"] = Field(
        default="kmeans", description="Semantic method; `none` for instance-only runs (see `instances`)."
    )
    threshold: ThresholdConfig = ThresholdConfig()
    kmeans: KMeansConfig = KMeansConfig()
    unet: UNetConfig = UNetConfig()

    @model_validator(mode="after")
    def _model_given(self) -> SegmentConfig:
        if self.method == "unet" and self.unet.model is None:
            raise ValueError("segment.method 'unet' needs segment.unet.model (a .safetensors file)")
        return self


class StitchConfig(_Model):
    """Options of the COG writer."""

    overview_resampling: Literal["nearest", "mode"] = Field(
        default="nearest", description="Overviews of a label raster never average."
    )
    compress: Literal["deflate", "zstd", "lzw"] = "deflate"
    level: int | None = Field(
        default=None,
        ge=1,
        le=22,
        description="Compression level: deflate 1-12, zstd 1-22, none for lzw; null: GDAL's default (deflate 6, "
        "zstd 9). Deflate 1 to 4 compresses the COG twice as fast, files 14 to 41 % larger (README 'Performance').",
    )
    blocksize: int = Field(default=512, ge=64, le=4096, description="COG tile edge in pixels (multiple of 16).")

    @field_validator("blocksize")
    @classmethod
    def _multiple_of_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError("blocksize must be a multiple of 16")
        return v

    @model_validator(mode="after")
    def _level_fits_compress(self) -> StitchConfig:
        top = {"deflate": 12, "zstd": 22, "lzw": None}[self.compress]
        if self.level is not None and (top is None or self.level > top):
            allowed = "no level" if top is None else f"a level from 1 to {top}"
            raise ValueError(f"stitch.level {self.level} does not fit compress {self.compress!r}: it takes {allowed}")
        return self


#: A class given by name (as in ``classes``) or by integer id / raw value.
ClassRef = str | int


def _stringify_keys(v: Any) -> Any:
    # YAML reads `311: forest` with an int key; class maps are keyed by the value's text
    if isinstance(v, dict):
        return {str(k): val for k, val in v.items()}
    return v


class GroundTruthConfig(_Model):
    """Ground truth: a raster of class ids, or vector features with a class column.

    Raster ground truth on another grid or CRS is reprojected onto the prediction grid
    with nearest neighbour. Vector ground truth (any OGR format: GeoPackage, GeoJSON,
    Shapefile, ...) is rasterized onto the prediction grid: polygons as they are,
    lines (and points) buffered by ``line_buffer`` map units on each side.
    """

    path: Path
    class_column: str | None = Field(
        default=None, description="For vectors: column whose values are class names (or ids), or keys of class_map."
    )
    class_map: dict[str, ClassRef] | None = Field(
        default=None,
        description=(
            "Map from ground-truth values (vector column values, or raster values, as text) to class names or ids. "
            "With a map, values not in it are unlabeled. Without one, values must be class names or ids."
        ),
    )
    nodata: int | None = Field(
        default=None, description="Raster ground truth: value meaning 'unlabeled' (default: the file's nodata)."
    )
    ignore_classes: list[ClassRef] = Field(
        default_factory=list,
        description="Ground-truth classes (names or ids, or raw raster values) whose pixels are left out of the evaluation.",
    )
    line_buffer: float | None = Field(
        default=None,
        gt=0,
        description="Vector lines and points: buffer distance on each side, in map units of the prediction's CRS.",
    )

    @field_validator("class_map", mode="before")
    @classmethod
    def _keys_as_text(cls, v: Any) -> Any:
        return _stringify_keys(v)


class PredictionConfig(_Model):
    """How the prediction raster is read for evaluation."""

    nodata: int | None = Field(
        default=None, description="Prediction value meaning 'no prediction', overriding the file's nodata tag."
    )
    ignore_classes: list[ClassRef] = Field(
        default_factory=list,
        description="Predicted classes (names or ids) whose pixels are left out of the evaluation.",
    )


class AreaConfig(_Model):
    """Evaluation area: exactly one of a bounding box, a polygon file or a mask raster.

    A pixel is inside when its centre is inside the box (half-open, see :class:`BBox`),
    inside any polygon of the file (rasterized like ground truth, centre rule), or where
    the mask raster (reprojected with nearest neighbour) is non-zero and not nodata.
    A plain ``{xmin, ymin, xmax, ymax}`` mapping is read as ``bbox``.
    """

    bbox: BBox | None = None
    polygons: Path | None = Field(default=None, description="Polygon file (any OGR format); any feature counts.")
    mask: Path | None = Field(default=None, description="Mask raster: non-zero (and not nodata) = inside.")

    @model_validator(mode="before")
    @classmethod
    def _plain_bbox(cls, v: Any) -> Any:
        if isinstance(v, dict) and {"xmin", "ymin", "xmax", "ymax"} & set(v):
            return {"bbox": v}
        if isinstance(v, BBox):
            return {"bbox": v}
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> AreaConfig:
        given = [k for k in ("bbox", "polygons", "mask") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bbox, polygons, mask (got {given or 'none'})")
        return self

    def describe(self) -> str:
        """One line for reports, e.g. ``bbox (337680, 5814360, 345360, 5822040)``."""
        if self.bbox is not None:
            b = self.bbox
            return "bbox (" + ", ".join(f"{v:.12g}" for v in (b.xmin, b.ymin, b.xmax, b.ymax)) + ")"
        return f"polygons {self.polygons}" if self.polygons is not None else f"mask {self.mask}"



class MaskRCNNTrainConfig(_Model):
    """Options that only Mask R-CNN training uses (``train.arch: maskrcnn``)."""

    anchor_sizes: list[int] = Field(
        default=[16, 32, 64, 128, 256], min_length=5, max_length=5,
        description="Anchor edge per FPN level, pixels (torchvision's default is 32 ... 512).",
    )  # fmt: skip
    negatives: float = Field(
        default=0.1, ge=0, description="Chips without any object kept, as a fraction of the chips with objects."
    )
    rois_per_image: int = Field(
        default=128, ge=4, description="Proposals sampled per chip for the box and mask heads (a quarter positive)."
    )


class TrainConfig(_Model):
    """Training a segmentation model on labeled rasters (`tileseg train`)."""

    arch: str = Field(
        default="Unet",
        description="smp architecture (Unet, FPN, ...), 'fcn_resnet50', or 'maskrcnn' (instances; the ground truth "
        "is a raster of instance ids).",
    )
    target: Literal["semantic", "instance_boundary"] = Field(
        default="semantic",
        description="'semantic': ground truth are classes. 'instance_boundary': the ground truth is a raster of "
        "instance ids (0 = background), turned into background / interior / boundary classes for the watershed "
        "instance step.",
    )
    maskrcnn: MaskRCNNTrainConfig = MaskRCNNTrainConfig()
    encoder: str = Field(default="resnet18", description="smp encoder, or the ResNet backbone of a Mask R-CNN.")
    encoder_depth: int = Field(default=3, ge=1, le=5)
    decoder_channels: list[int] | None = Field(default=[64, 32, 16])
    encoder_weights: str | None = Field(default=None, description="Pretrained encoder weights (needs internet).")
    bands: list[str] | None = Field(default=None, description="Input bands. Default: all bands of the store.")
    train_area: AreaConfig = Field(description="Where chips are cut: a bbox (map units), polygons or a mask raster.")
    val_area: AreaConfig = Field(description="Where early stopping is judged; same forms as train_area.")
    tile: int = Field(default=128, ge=16, description="Training chip edge, pixels.")
    stride: int = Field(default=64, ge=1, description="Stride between candidate chips, pixels.")
    epochs: int = Field(default=40, ge=1)
    patience: int = Field(default=8, ge=1, description="Early stopping: epochs without a better validation mIoU.")
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(default="constant", description="Learning-rate schedule.")
    spectral_jitter: float = Field(default=0.0, ge=0, lt=1, description="Per-band random gain 1 ± this, in training.")
    weight_decay: float = Field(default=1e-4, ge=0)
    loss: Literal["ce", "dice", "ce+dice"] = "ce+dice"
    class_weighting: Literal["none", "inverse_sqrt"] = Field(
        default="none", description="Cross-entropy class weights from the training label frequencies."
    )
    seed: int = 0
    refit: bool = Field(
        default=False,
        description="After early stopping, train a fresh model on training + validation chips for the best "
        "epoch count, and save that one.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: Path = Field(default=Path("models/model.safetensors"), description="Where the model is saved.")

    @model_validator(mode="after")
    def _instance_options(self) -> TrainConfig:
        if self.arch == "maskrcnn" and self.target != "semantic":
            raise ValueError("train.arch maskrcnn always reads the ground truth as instance ids; remove train.target")
        if self.arch == "maskrcnn" and self.refit:
            raise ValueError("train.refit is not supported for train.arch maskrcnn")
        return self


class ReportConfig(_Model):
    """Options of the evaluation report (report.json / .md / .html)."""

    rgb_bands: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=3,
        description="Image bands of the quicklook (R, G, B). Default: B04, B03, B02 if present, else the first three.",
    )
    quicklook_px: int = Field(default=1000, ge=100, le=4000, description="Long side of the quicklook, in pixels.")
    checksums: bool = Field(
        default=True, description="Record SHA-256 checksums of the input files (reads each file once more)."
    )


class EvaluateConfig(_Model):
    """Options of the evaluate stage."""

    ground_truth: GroundTruthConfig | None = None
    prediction: PredictionConfig = PredictionConfig()
    area: AreaConfig | None = Field(
        default=None,
        description="Evaluation area: {xmin, ymin, xmax, ymax} (map units), {polygons: FILE} or {mask: RASTER}. "
        "Default: the whole raster.",
    )
    image: Path | None = Field(
        default=None,
        description="Image for valid(image) and the report's quicklook: a tileseg store or a raster. "
        "Default: the prediction's own store, or the run's store (tileseg run).",
    )
    report: ReportConfig = ReportConfig()
    instances: InstanceEvaluateConfig | None = Field(
        default=None, description="Object-level evaluation of the instance ids (matching at IoU 0.5 ... 0.95)."
    )


class DaskConfig(_Model):
    """Which Dask cluster runs the per-chunk work."""

    scheduler_address: str | None = Field(
        default=None, description="Address of an existing scheduler (tcp://host:8786). None: start a LocalCluster."
    )
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)

    @field_validator("scheduler_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        """A ``dask.distributed`` address: a known scheme (``tcp`` when none is given) and, for
        the network schemes, ``host:port``; checked by distributed's own parsers, before any
        connection is tried."""
        if v is None:
            return v
        import re

        from distributed.comm import registry
        from distributed.comm.addressing import parse_address, parse_host_port

        try:
            scheme, loc = parse_address(v)
            registry.get_backend(scheme)
            if scheme != "inproc":
                host, _ = parse_host_port(loc)
                if not re.fullmatch(r"[A-Za-z0-9._:-]+", host):
                    raise ValueError(f"{host!r} is not a host name or IP address")
        except ValueError as exc:
            raise ValueError(f"{v!r} is not a Dask scheduler address such as tcp://scheduler:8786 ({exc})") from None
        return v
    memory_limit: str = Field(default="4GiB", description="Per worker, for the LocalCluster: bytes ('4GiB', "
                              "'6 GB') or 'auto' (the machine's memory shared by the workers).")  # fmt: skip
    processes: bool = Field(default=True, description="LocalCluster workers as processes (True) or threads.")
    progress: bool = Field(default=True, description="Show a progress bar for each stage.")
    @field_validator("memory_limit")
    @classmethod
    def _bytes(cls, v: str) -> str:
        from dask.utils import parse_bytes

        if v != "auto":
            try:
                parse_bytes(v)
            except (ValueError, TypeError):
                raise ValueError(f"{v!r} is not an amount of memory (for example 4GiB) or 'auto'") from None
        return v

    gpu_workers: Literal["auto", "off"] = Field(
        default="auto",
        description="'auto': without scheduler_address, with worker processes and GPUs present "
        "(torch.cuda.device_count() > 0), start one worker per GPU (pinned with CUDA_VISIBLE_DEVICES, "
        "resource GPU=1) instead of n_workers; U-Net inference tasks then ask for a GPU. 'off': CPU workers only.",
    )
    scheduler: Literal["auto", "distributed", "threads"] = Field(
        default="auto",
        description="'distributed': a dask.distributed cluster (a LocalCluster, or scheduler_address). "
        "'threads': no cluster; Dask's threaded scheduler in this process with n_workers x threads_per_worker "
        "threads: on one machine its per-task cost is about 20x lower (README, Performance). "
        "'auto': 'distributed' with a scheduler_address or GPU workers (gpu_workers auto, GPUs present), "
        "else 'threads'.",
    )

    @model_validator(mode="after")
    def _threads_alone(self) -> DaskConfig:
        if self.scheduler == "threads" and self.scheduler_address:
            raise ValueError("dask.scheduler 'threads' runs in this process; unset dask.scheduler_address, "
                             "or use dask.scheduler 'distributed'")  # fmt: skip
        return self


class RunConfig(_Model):
    """A whole run: inputs, every stage's options, and where outputs go.

    Outputs: ``<output_dir>/scene.zarr`` (image and labels), ``<output_dir>/labels.tif``
    (COG), and the evaluation's ``report.json``, ``report.md``, ``report.html`` and
    ``error_map.tif`` (COG).
    """

    name: str = "tileseg-run"
    inputs: list[Path] = Field(default_factory=list, description="Raster files: one multi-band or several single-band.")
    output_dir: Path = Path("outputs/run")
    classes: list[ClassInfo] = Field(default_factory=list, description="Class names; a class id is its position here.")
    ingest: IngestConfig = IngestConfig()
    segment: SegmentConfig = SegmentConfig()
    stitch: StitchConfig = StitchConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    train: TrainConfig | None = None
    dask: DaskConfig = DaskConfig()
    # Instance segmentation and microscopy inputs (classes defined at the end of this module)
    instances: InstanceConfig | None = Field(
        default=None, description="Instance segmentation (an id per object). None: semantic segmentation only."
    )
    microscopy: MicroscopyConfig = Field(
        default_factory=lambda: MicroscopyConfig(), description="Options for microscopy inputs (TIFF, OME-TIFF, zarr)."
    )
    overwrite: bool = Field(
        default=False,
        description="Replace outputs of another run and recompute every stage (the CLI's --overwrite). "
        "Default: reuse what this run already finished, refuse another run's outputs.",
    )
    # Last, and left out of model_dump (so of config_hash and of a deployment's parameters):
    # scheduling does not change a run's results. Defined at the end of this module.
    deploy: DeployConfig | None = Field(
        default=None, exclude=True, description="Schedule of `tileseg deploy` (ignored by a run itself)."
    )

    @field_validator("classes", mode="before")
    @classmethod
    def _names_as_classes(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": c} if isinstance(c, str) else c for c in v]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError("class names must be unique")
        if len(names) > 255:
            raise ValueError("at most 255 classes (id 255 is the label nodata)")
        if self.segment.method == "none" and self.instances is None:
            raise ValueError("segment.method 'none' segments nothing: give an `instances` section, or pick "
                             "threshold, kmeans or unet")
        km = self.segment.kmeans
        if self.segment.method == "kmeans" and km.map_to_classes:
            if self.evaluate.ground_truth is None or not self.classes:
                raise ValueError("segment.kmeans.map_to_classes needs evaluate.ground_truth and classes")
            if km.train_area is None:
                raise ValueError("segment.kmeans.map_to_classes needs segment.kmeans.train_area")
        return self

    @property
    def store_path(self) -> Path:
        return self.output_dir / "scene.zarr"

    @property
    def cog_path(self) -> Path:
        return self.output_dir / "labels.tif"

    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def config_hash(self) -> str:
        """:func:`config_hash` of this config without ``dask`` and ``overwrite``, which change
        no output: the identity of a run's outputs (see :mod:`pipeline.resume`). The CLI and
        the flows hash the config after :func:`absolute_paths`, so the same relative config run
        from two directories (two different inputs) are two runs."""
        return config_hash(self.model_dump(mode="json", exclude={"dask", "overwrite"}))


def check_scorable(cfg: RunConfig) -> None:
    """Refuse a run that would score k-means cluster ids as classes: ``segment.method: kmeans``
    without ``map_to_classes`` and with ``evaluate.ground_truth`` (the flows call this first;
    ``tileseg evaluate`` of any prediction is not concerned).

    Raises:
        ConfigError: naming both remedies.
    """
    if cfg.segment.method == "kmeans" and not cfg.segment.kmeans.map_to_classes and cfg.evaluate.ground_truth:
        raise ConfigError("segment.kmeans without map_to_classes gives cluster ids, not classes, so they cannot be "
                          "scored against evaluate.ground_truth: set segment.kmeans.map_to_classes (with a "
                          "train_area), or evaluate.ground_truth: null")  # fmt: skip


def config_hash(config: BaseModel | dict[str, Any]) -> str:
    """Stable ``sha256:<hex>`` of a config (a model, or a JSON-ready mapping): SHA-256 of its
    canonical JSON (keys sorted, no whitespace, paths as given), so equal configs hash
    equally across runs and machines."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def absolute_path(path: Path | str, base: Path | str | None = None) -> Path:
    """``path`` made absolute against ``base`` (default: the current directory), ``~``
    expanded and ``..`` collapsed (:func:`os.path.abspath`); URLs (``s3://...``) and GDAL's
    virtual file systems (``/vsicurl/...``) are returned as they are."""
    text = str(path)
    if "://" in text or text.startswith("/vsi"):
        return Path(path)
    return Path(os.path.abspath(Path(base if base is not None else Path.cwd()) / Path(path).expanduser()))


def absolute_paths(model: M, base: Path | str | None = None) -> M:
    """A copy of a config ``model`` with every path (``Path`` fields, also in lists and nested
    models) made absolute by :func:`absolute_path` against ``base`` (default: the current
    directory).

    Paths are handed to Dask tasks, which may run on the workers of an existing cluster in
    another working directory: there ``data/scene.tif`` would name another file, or none.
    """
    root = Path(base) if base is not None else Path.cwd()

    def fix(v: Any) -> Any:
        if isinstance(v, Path):
            return absolute_path(v, root)
        if isinstance(v, BaseModel):
            return absolute_paths(v, root)
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return model.model_copy(update={name: fix(getattr(model, name)) for name in type(model).model_fields})


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings to a raw config mapping (values parsed as YAML).

    Raises:
        ConfigError: an override lacks ``=``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def validate_config(data: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`.

    Raises:
        ConfigError: with one line per invalid field, naming the field.
    """
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid config: {problems}") from None


def load_config(path: Path | str | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config and apply ``--set`` overrides.

    Args:
        path: YAML file, or None for the built-in defaults.
        overrides: ``["segment.method=threshold", ...]``.

    Raises:
        ConfigError: missing or unparsable file, unknown keys, wrong types.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {p} is not valid YAML: {exc}".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {p} must be a mapping at the top level")
        data = loaded or {}
    return validate_config(apply_overrides(data, overrides or []))


class DeployConfig(_Model):
    """How ``tileseg deploy`` serves this config as Prefect deployments (all optional).

    The cron expression is validated by Prefect when the deployment is built (five
    fields: minute hour day-of-month month day-of-week, as in crontab(5)).
    """

    name: str | None = Field(
        default=None, description="Deployment name; the deployment is FLOW/NAME. Default: the run's `name`."
    )
    cron: str | None = Field(
        default=None, description="Cron schedule of landcover_run, e.g. '0 3 * * *'. None: no schedule (ad-hoc only)."
    )
    timezone: str = Field(default="UTC", description="IANA time zone of the cron schedule, e.g. 'Europe/Berlin'.")
    tags: list[str] = Field(default_factory=list, description="Tags of the deployments (filters in the Prefect UI).")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'") from None
        return v


RunConfig.model_rebuild()
