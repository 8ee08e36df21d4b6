"""The evaluate stage: a label raster against ground truth -> report files and an error map.

Like :mod:`pipeline.stages` (which re-exports :func:`evaluate`), this module mixes I/O
and compute; it lives apart so that neither module passes ~600 lines. The per-chunk
work is one Dask pass (:func:`pipeline.apply.evaluation`): every chunk's ground truth is
read or rasterized once, its confusion counts are summed into ONE global matrix, and its
error-map chunk is written to a temporary zarr array, from which one process then writes
the error-map COG (design note: one writer per GeoTIFF).

The evaluation mask is area ∧ valid(image) ∧ valid(ground truth) ∧ valid(prediction);
see :data:`pipeline.metrics.EXCLUSION_REASONS` for the order in which excluded pixels
are attributed to a reason.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from rasterio.windows import Window

from pipeline import apply, report_html
from pipeline import report as rep
from pipeline.classes import class_colormap, resolve_ids, value_lookup
from pipeline.cluster import compute
from pipeline.config import (
    GT_NODATA,
    LABEL_NODATA,
    AreaConfig,
    BBox,
    ClassInfo,
    GroundTruthConfig,
    PredictionConfig,
    ReportConfig,
    config_hash,
)
from pipeline.errors import InputError
from pipeline.grid import Grid, bounds_window, chunk_sizes
from pipeline.io import files
from pipeline.io import raster as rio_io
from pipeline.io import store as zstore
from pipeline.io import vector as vec_io
from pipeline.metrics import EXCLUSION_REASONS, SemanticMetrics, semantic_metrics
from pipeline.nodata import fits

log = logging.getLogger("tileseg")

ERROR_NAMES = ["excluded", "correct", "wrong"]


# --------------------------------------------------------------------------- inputs
def _transform_bounds(bounds, src_wkt: str | None, dst_wkt: str | None) -> tuple[float, float, float, float]:
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds

    if src_wkt and dst_wkt and CRS.from_wkt(src_wkt) != CRS.from_wkt(dst_wkt):
        return tuple(transform_bounds(CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt), *bounds, densify_pts=21))
    return tuple(bounds)  # type: ignore[return-value]


def _fmt_extent(b) -> str:
    return "(" + ", ".join(f"{v:.3f}".rstrip("0").rstrip(".") for v in b) + ")"


def check_overlap(grid: Grid, bounds, crs_wkt: str | None, what: str, target: str = "the prediction") -> None:
    """Refuse an input whose extent (``bounds`` in ``crs_wkt``) misses ``grid``, or whose CRS
    cannot be related to the grid's (one of them has a CRS, the other none).

    Raises:
        InputError: naming both extents, in the grid's CRS.
    """
    if (crs_wkt is None) != (grid.crs_wkt is None):
        has, lacks = (what, target) if crs_wkt is not None else (target, what)
        raise InputError(f"{has} has a CRS but {lacks} has none; assign the same CRS to both")
    b = grid.bounds()
    o = _transform_bounds(bounds, crs_wkt, grid.crs_wkt)
    if o[0] >= b[2] or o[2] <= b[0] or o[1] >= b[3] or o[3] <= b[1]:
        raise InputError(f"{what} (extent {_fmt_extent(o)}) does not overlap {target} (extent {_fmt_extent(b)})")


def ground_truth_array(gt: GroundTruthConfig, grid: Grid, chunks, class_names: list[str],
                       target: str = "the prediction") -> tuple[da.Array, int]:  # fmt: skip
    """Lazy ground truth (y, x) on ``grid`` and the value it takes where unlabeled.

    Vectors are rasterized (uint8, unlabeled = ``GT_NODATA``); rasters are reprojected
    with nearest neighbour (int64, unlabeled = ``apply.GT_UNLABELED``). ``gt.class_map``
    maps values to classes; without it, values are class names or ids (raster values are
    not checked here: the evaluation counts those outside 0..len(class_names) - 1, training
    refuses them). ``target`` names ``grid`` in the no-overlap error.

    Raises:
        InputError: no overlap with the grid, bad class column or map, lines without a buffer.
        ConfigError: a class_map value is not a class.
    """
    path = str(gt.path)
    lookup = value_lookup(class_names, gt.class_map)
    if vec_io.is_vector(path):
        bounds, crs = vec_io.layer_bounds(path)
        check_overlap(grid, bounds, crs, f"ground truth {path}", target)
        vec_io.check_vector(path, gt.class_column, lookup, gt.line_buffer)
        arr = apply.ground_truth(path, grid, chunks, GT_NODATA, gt.class_column, lookup, is_vector=True,
                                 line_buffer=gt.line_buffer)  # fmt: skip
        return arr, GT_NODATA
    info = rio_io.raster_info(path)
    check_overlap(grid, info.grid.bounds(), info.grid.crs_wkt, f"ground truth {path}", target)
    nodata: float | None = gt.nodata if gt.nodata is not None else info.nodata
    if gt.nodata is not None and not fits(gt.nodata, info.dtype):
        raise InputError(f"ground-truth nodata {gt.nodata:g} cannot occur in {path} ({info.dtype})")
    if nodata is None:  # no nodata anywhere: the dtype's max (NaN for floats) marks "unlabeled" and "outside"
        dt = np.dtype(info.dtype)
        nodata = float("nan") if dt.kind == "f" else int(np.iinfo(dt).max)
    raster_lookup = None
    if gt.class_map is not None:
        try:
            raster_lookup = {int(k): v for k, v in lookup.items()}
        except ValueError:
            raise InputError(f"class_map keys of raster ground truth {path} must be integers, got {sorted(lookup)}") from None
    return apply.ground_truth(path, grid, chunks, nodata, lookup=raster_lookup), apply.GT_UNLABELED


@dataclass
class _Prediction:
    labels: da.Array
    grid: Grid
    nodata: int | None
    class_names: list[str]
    colormap: dict[int, tuple[int, int, int, int]] | None
    store_image: Any = None  # the store's image DataArray when the prediction is a store


def _prediction(pred: Path, chunk: int, nodata_override: int | None) -> _Prediction:
    """Lazy prediction (y, x), its grid, nodata, class names (tags or attrs) and colour table."""
    if (pred / "zarr.json").is_file():
        ds = zstore.open_store(pred)
        if zstore.LABELS not in ds:
            raise InputError(f"{pred} has no labels; run segment first")
        lab = ds[zstore.LABELS]
        nodata = lab.attrs.get("nodata") if nodata_override is None else nodata_override
        image = ds[zstore.IMAGE] if zstore.IMAGE in ds else None
        return _Prediction(lab.data, zstore.store_grid(ds), nodata, list(lab.attrs.get("class_names") or []), None, image)
    info = rio_io.raster_info(pred)
    if np.dtype(info.dtype).kind not in "iu":
        raise InputError(f"prediction {pred} has dtype {info.dtype}; a label raster of integer class ids is needed")
    grid = info.grid
    arr = apply.read_band(str(pred), (chunk_sizes(grid.height, chunk), chunk_sizes(grid.width, chunk)), info.dtype)
    names = json.loads(info.tags["CLASS_NAMES"]) if "CLASS_NAMES" in info.tags else []
    if nodata_override is not None and not fits(nodata_override, info.dtype):
        raise InputError(f"prediction nodata {nodata_override} cannot occur in {pred} ({info.dtype})")
    nodata = nodata_override if nodata_override is not None else (int(info.nodata) if info.nodata is not None else None)
    return _Prediction(arr, grid, nodata, names, info.colormap)


@dataclass
class _Image:
    data: da.Array  # (band, y, x) on the prediction grid, chunked like the prediction
    band_names: list[str]
    nodata: float | None
    path: Path


def _image(p: _Prediction, pred: Path, image: Path | None, optional: bool) -> tuple[_Image | None, str]:
    """The image used for valid(image) and the quicklook, and a sentence saying which.
    ``optional``: an image store on another grid is skipped (and said so) instead of refused."""
    chunks = p.labels.chunks
    if image is None and p.store_image is not None:
        arr, path = p.store_image, pred
    elif image is not None and (Path(image) / "zarr.json").is_file():
        ds = zstore.open_store(image)
        if zstore.IMAGE not in ds:
            raise InputError(f"{image} has no image")
        if not rio_io.same_grid(zstore.store_grid(ds), p.grid):
            if optional:
                return None, f"not available: the store {image} is not on the prediction's grid"
            raise InputError(f"image store {image} is not on the prediction's grid; give a raster or the matching store")
        arr, path = ds[zstore.IMAGE], Path(image)
    elif image is not None:
        bands = rio_io.describe_sources([image])
        check_overlap(p.grid, bands[0].grid.bounds(), bands[0].grid.crs_wkt, f"image {image}")
        nodata = bands[0].nodata
        data = apply.read_image(bands, p.grid, max(chunks[0][0], chunks[1][0]), "nearest", nodata)
        data = data.rechunk(((len(bands),),) + chunks)
        names = [b.name for b in bands]
        return _Image(data, names, nodata, Path(image)), f"image {image} (reprojected with nearest neighbour if needed)"
    else:
        return None, "not available: the prediction is a plain raster and no image was given (evaluate.image / --image)"
    data = arr.data.rechunk(((arr.shape[0],),) + chunks)
    nodata = arr.attrs.get("nodata")
    names = list(arr.attrs.get("band_names") or [f"band_{i + 1}" for i in range(arr.shape[0])])
    return _Image(data, names, nodata, path), f"image of the store {path}"


def area_mask_and_window(area: AreaConfig | None, grid: Grid, chunks, role: str = "evaluation area"
                         ) -> tuple[da.Array | None, Window]:  # fmt: skip
    """Lazy bool (y, x) area mask (None: the whole raster) and the window of the grid it spans.

    Raises:
        InputError: the area does not overlap the grid (both extents named).
    """
    full = Window(0, 0, grid.width, grid.height)
    if area is None:
        return None, full
    if area.bbox is not None:
        b = area.bbox
        bounds, crs, what = (b.xmin, b.ymin, b.xmax, b.ymax), grid.crs_wkt, f"{role} {area.describe()}"
        mask = apply.area_mask(grid, chunks, bounds)
    elif area.polygons is not None:
        bounds, crs = vec_io.layer_bounds(area.polygons)
        what = f"{role} {area.polygons}"
        mask = apply.polygon_area_mask(str(area.polygons), grid, chunks)
    else:
        info = rio_io.raster_info(area.mask)
        bounds, crs, what = info.grid.bounds(), info.grid.crs_wkt, f"{role} mask {area.mask}"
        mask = apply.raster_area_mask(str(area.mask), grid, chunks, info.nodata)
    check_overlap(grid, bounds, crs, what)
    window = bounds_window(grid, _transform_bounds(bounds, crs, grid.crs_wkt)) or full
    return mask, window


def _rgb_indices(band_names: list[str], wanted: list[str] | None) -> list[int]:
    if wanted:
        missing = [b for b in wanted if b not in band_names]
        if missing:
            raise InputError(f"evaluate.report.rgb_bands {missing} are not image bands; bands are {band_names}")
        return [band_names.index(b) for b in wanted]
    if all(b in band_names for b in ("B04", "B03", "B02")):
        return [band_names.index(b) for b in ("B04", "B03", "B02")]
    return list(range(min(3, len(band_names))))


# --------------------------------------------------------------------------- the stage
@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns: the metrics, the class names, the report (as written
    to report.json) and the paths of the files written."""

    metrics: SemanticMetrics
    class_names: list[str]
    report_json: Path
    report_md: Path
    report_html: Path | None = None
    error_map: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def paths(self) -> dict[str, str]:
        """Output name -> path, for printing."""
        out = {"report_json": self.report_json, "report_md": self.report_md, "report_html": self.report_html,
               "error_map": self.error_map}  # fmt: skip
        return {k: str(v) for k, v in out.items() if v is not None}


def _names_and_classes(class_names: Sequence[str | ClassInfo] | None, fallback: list[str]):
    infos = [c for c in class_names or [] if isinstance(c, ClassInfo)]
    names = [c.name if isinstance(c, ClassInfo) else str(c) for c in class_names or []] or list(fallback)
    return names, infos


def evaluate(
    pred: Path,
    gt: GroundTruthConfig,
    class_names: Sequence[str | ClassInfo] | None = None,
    area: AreaConfig | BBox | None = None,
    out_dir: Path | None = None,
    chunk: int = 512,
    progress: bool = True,
    *,
    prediction: PredictionConfig | None = None,
    image: Path | None = None,
    report: ReportConfig | None = None,
    run_config_hash: str | None = None,
    image_optional: bool = False,
    overwrite: bool = False,
) -> EvaluationResult:
    """Compare a label raster (any GeoTIFF/COG of integer class ids, or a tileseg store)
    with ground truth, and write the report files and the error map.

    Ground truth is a raster on any grid or CRS (reprojected onto the prediction grid
    with nearest neighbour) or vector features with a class column (rasterized onto the
    prediction grid; lines and points buffered by ``gt.line_buffer`` map units; rule in
    :mod:`pipeline.io.vector`). One confusion matrix is accumulated over the chunks on
    Dask; every metric comes from it (:mod:`pipeline.metrics`).

    Args:
        class_names: class names (id = position), or ``ClassInfo`` with colours. Default:
            the prediction's ``CLASS_NAMES`` tag or store attribute.
        area: evaluation area (a ``BBox`` means ``AreaConfig(bbox=...)``). Default: all.
        out_dir: where the outputs go (default: next to ``pred``).
        chunk: chunk edge in pixels for a raster prediction (a store keeps its chunks).
        prediction: nodata override and ignored classes of the prediction.
        image: image for valid(image) and the quicklook (a tileseg store or a raster).
            Default: the prediction's store when ``pred`` is a store; else none, which
            the report states.
        image_optional: ``image`` is a guess (the run's store): skip it, saying so in the
            report, when it is not on the prediction's grid, instead of refusing.
        report: quicklook bands and size, checksums on/off.
        run_config_hash: hash of the run config to record; default: the hash of this
            call's evaluation settings.
        overwrite: replace a report of another run (another ``config_hash``) in ``out_dir``;
            without it such a report is refused, while this run's own report is replaced.

    Writes (each under a temporary name; renamed together, in this order, once all are
    complete, so ``report.json`` appears last and a failed run leaves the earlier set
    whole): ``error_map.tif`` (COG; 1 correct, 2 wrong, 0 excluded, the prediction's
    nodata where it has none), ``report.html``, ``report.md``, ``report.json``.

    Raises:
        InputError: no class names, class ids outside the class list, no pixel left to evaluate, an input that
            does not overlap the prediction, bad vector ground truth.
        ConfigError: a class named in ignore_classes or class_map is not in the class list.
        RasterIOError: unreadable inputs, unwritable outputs.
        OutputExistsError: ``out_dir`` holds another run's report (and not ``overwrite``).
    """
    from pipeline.resume import check_report

    pred = Path(pred)
    prediction = prediction or PredictionConfig()
    report = report or ReportConfig()
    if isinstance(area, BBox):
        area = AreaConfig(bbox=area)
    p = _prediction(pred, chunk, prediction.nodata)
    names, infos = _names_and_classes(class_names, p.class_names)
    if not names:
        raise InputError(f"no class names known for {pred}; give them (config `classes` or --classes)")
    k = len(names)
    chunks = p.labels.chunks
    gt_arr, gt_nodata = ground_truth_array(gt, p.grid, chunks, names)
    gt_ignore = resolve_ids(gt.ignore_classes, names, "evaluate.ground_truth.ignore_classes", allow_raw=True)
    pred_ignore = resolve_ids(prediction.ignore_classes, names, "evaluate.prediction.ignore_classes", allow_raw=True)
    mask, window = area_mask_and_window(area, p.grid, chunks)
    img, image_note = _image(p, pred, image, image_optional)
    valid = apply.image_valid(img.data, img.nodata) if img is not None else None
    err_nodata = p.nodata if p.nodata is not None and 3 <= p.nodata <= 255 else LABEL_NODATA
    counts, errors = apply.evaluation(gt_arr, p.labels, k, gt_nodata, p.nodata, mask, valid, gt_ignore, pred_ignore,
                                      err_nodata)  # fmt: skip

    # quicklook: the area's window, decimated by a whole stride to at most quicklook_px on its long side
    step = max(1, math.ceil(max(window.height, window.width) / report.quicklook_px))
    rows = slice(int(window.row_off), int(window.row_off + window.height), step)
    cols = slice(int(window.col_off), int(window.col_off + window.width), step)
    looks = [p.labels[rows, cols], gt_arr[rows, cols], errors[rows, cols]]
    if img is not None:
        looks += [img.data[_rgb_indices(img.band_names, report.rgb_bands)][:, rows, cols], valid[rows, cols]]

    settings = {
        "prediction": str(pred), "ground_truth": gt.model_dump(mode="json"), "class_names": names,
        "area": area.model_dump(mode="json") if area else None, "prediction_options": prediction.model_dump(mode="json"),
        "image": str(image) if image else None,
    }  # fmt: skip
    key = run_config_hash or config_hash(settings)
    out_dir = Path(out_dir) if out_dir else pred.parent
    check_report(out_dir, key, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_errors = files.tmp_sibling(out_dir / "error_map.zarr")
    error_map = out_dir / "error_map.tif"
    tmp_error_map = files.tmp_sibling(error_map)
    try:
        counts, _, *looks = compute(counts, zstore.write_array(errors, tmp_errors), *looks,
                                    label="evaluate: confusion matrix and error map", progress=progress,
                                    writes=tmp_errors)  # fmt: skip
        counts = np.asarray(counts)
        excluded = dict(zip(EXCLUSION_REASONS, (int(v) for v in counts[k * k :])))
        if excluded["out_of_range"]:
            raise InputError(
                f"{excluded['out_of_range']} pixels have class ids outside 0..{k - 1} in the prediction or ground "
                f"truth; the class list {names} is incomplete (or set nodata / ignore_classes)"
            )
        del excluded["out_of_range"]
        if counts[: k * k].sum() == 0:
            why = ", ".join(f"{r.replace('_', ' ')} {n:,}" for r, n in excluded.items() if n)
            raise InputError(f"no pixel left to evaluate: every pixel is excluded ({why}); check the ground "
                             "truth's nodata and classes, the prediction's nodata, the area and the ignore lists")  # fmt: skip
        ignored = [c for c in gt_ignore + pred_ignore if 0 <= c < k]
        metrics = semantic_metrics(counts[: k * k].reshape(k, k), excluded, ignored)
        _write_error_map(tmp_errors, tmp_error_map, p.grid, err_nodata)
    except BaseException:
        tmp_error_map.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp_errors, ignore_errors=True)

    try:  # the error map waits under its temporary name until the reports are ready
        # class colours: the prediction COG's colour table for the classes it names, else config colours / palette
        colours = class_colormap(names, infos)
        cog_ids = range(len(p.class_names) if p.class_names else k)
        colours = {c: tuple((p.colormap or {}).get(c, colours[c])) if c in cog_ids else colours[c] for c in range(k)}
        inputs: dict[str, Any] = {"prediction": pred, "ground_truth": gt.path}
        if img is not None:
            inputs["image"] = img.path
        if area is not None and area.bbox is None:
            inputs["area"] = area.polygons or area.mask
        doc = rep.report_dict(
            metrics,
            names,
            inputs={k2: (files.checksum(v) if report.checksums else {"path": str(v)}) for k2, v in inputs.items()},
            grid=p.grid,
            context={
                "config_hash": key,
                "config_hash_of": "run config" if run_config_hash else "evaluation settings",
                "area": area.describe() if area else "whole raster",
                "image_validity": image_note,
                "ground_truth_options": gt.model_dump(mode="json", exclude={"path"}),
                "prediction_options": {**prediction.model_dump(mode="json"), "nodata_used": p.nodata},
                "error_map": {"path": str(error_map), "values": {"0": "excluded", "1": "correct", "2": "wrong"},
                              "nodata": err_nodata},  # fmt: skip
                "colours": {names[c]: "#%02x%02x%02x" % v[:3] for c, v in colours.items()},
            },
        )
        quick = report_html.Quicklook.from_arrays(looks, step, window)
        texts = {
            "html": report_html.render(doc, metrics, names, colours, quick, p.grid.bounds(window)),
            "md": rep.markdown(doc),
            "json": json.dumps(doc, indent=2) + "\n",  # last: its presence means the set is complete
        }
        paths = {n: out_dir / f"report.{n}" for n in texts}
        files.publish_texts([(paths[n], text) for n, text in texts.items()], written=[(tmp_error_map, error_map)])
    finally:
        tmp_error_map.unlink(missing_ok=True)
    return EvaluationResult(metrics, names, paths["json"], paths["md"], paths["html"], error_map, doc)


def _write_error_map(tmp: Path, out: Path, grid: Grid, nodata: int) -> Path:
    """One process writes the error-map COG from the temporary zarr array, chunk by chunk."""
    arr = zstore.open_array(tmp)
    cy, cx = arr.chunks[0][0], arr.chunks[1][0]

    def blocks():
        for r in range(0, grid.height, cy):
            for c in range(0, grid.width, cx):
                h, w = min(cy, grid.height - r), min(cx, grid.width - c)
                yield Window(c, r, w, h), np.asarray(arr[r : r + h, c : c + w].compute(scheduler="sync"))

    cmap = {**report_html.ERROR_RGBA, nodata: (0, 0, 0, 0)}
    return rio_io.write_cog(out, grid, "uint8", nodata, blocks(), colormap=cmap, class_names=ERROR_NAMES,
                            blocksize=512, overview_resampling="nearest", description="error map")  # fmt: skip
