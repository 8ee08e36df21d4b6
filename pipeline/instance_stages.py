"""Instance stages: segment objects (an id per object) into the store, export them, and
evaluate them object by object. Like :mod:`pipeline.stages`, these mix I/O and compute;
the per-chunk work is :mod:`pipeline.instances` (Dask glue) over the kernels of
:mod:`pipeline.segment.instances`, the metrics :mod:`pipeline.object_metrics`.

Store layout: ``instances`` (y, x), uint16/uint32/uint64 ids 1..N (0 = background or
nodata), chunked like ``image``, with the store's grid, next to ``image`` and (for
panoptic runs) the semantic ``labels``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from pipeline import __version__, apply, resume
from pipeline.cluster import compute
from pipeline.config import InstanceConfig, InstanceEvaluateConfig
from pipeline.errors import ConfigError, InputError
from pipeline.grid import Grid, column_strips
from pipeline.instances import merge_plan, ordered_counts_pairs, relabel, segment_chunks, with_global_otsu
from pipeline.io import files
from pipeline.io import store as zstore
from pipeline.object_metrics import InstanceMetrics, dask_counts, instance_counts, instance_metrics
from pipeline.segment.instances import ClassicalInstances

log = logging.getLogger("tileseg")


def _pixel_size(ds) -> float | None:
    """Mean of the store's (y, x) ``pixel_size_um``, or None."""
    p = ds.attrs.get("pixel_size_um") or ds[zstore.IMAGE].attrs.get("pixel_size_um")
    if not p:
        return None
    y, x = float(p[0]), float(p[1])
    if abs(y - x) > 0.01 * max(y, x):
        log.warning("pixels are not square (%g x %g µm); lengths in µm use their mean", y, x)
    return (y + x) / 2


def classical_kernel(cfg: InstanceConfig, band_names: list[str], pixel_size_um: float | None) -> ClassicalInstances:
    """The classical kernel for ``cfg``: bands by name, lengths converted with the pixel size.

    Raises:
        InputError: a band the store lacks.
        ConfigError: lengths in µm without a pixel size, or values out of range.
    """
    names = cfg.bands or band_names[:1]
    missing = [b for b in names if b not in band_names]
    if missing:
        raise InputError(f"instances.bands {missing} are not in the store (bands: {band_names})")
    if cfg.units == "um" and pixel_size_um is None:
        raise ConfigError("instances.units is 'um' but the store has no pixel size; give sizes in px "
                          "or set microscopy.pixel_size_um")  # fmt: skip
    return ClassicalInstances(
        threshold=cfg.threshold, bands=tuple(band_names.index(b) for b in names), polarity=cfg.polarity,
        sigma=cfg.sigma, max_diameter=cfg.max_diameter, min_distance=cfg.min_distance, min_size=cfg.min_size,
        fill_holes=cfg.fill_holes, split=cfg.split, footprint=cfg.footprint, compactness=cfg.compactness,
        edges=cfg.edges, units=cfg.units, pixel_size=pixel_size_um,
    )  # fmt: skip


def segment_instances(store: Path, cfg: InstanceConfig, progress: bool = True) -> Path:
    """Store ``image`` (band, y, x) -> ``instances`` (y, x): an id per object, whole across chunks.

    Steps (design note "Instances across chunks"; :mod:`pipeline.instances`): the global
    Otsu threshold of the smoothed signal when none is given; each chunk segmented with a
    halo of at least the kernel's need (pixels), its local ranks written to a scratch zarr
    array while the per-chunk counts and cross-border pairs are gathered (one kernel run
    per chunk); the union-find merge plan on the client; a relabel pass to ids 1..N in
    the smallest sufficient dtype, written as ``instances_partial`` and renamed onto
    ``instances`` at the end (an earlier ``instances`` survives a failure).

    Returns:
        ``store``.

    Raises:
        InputError: unknown bands, no valid pixel, constant signal (Otsu).
        ConfigError: halo below the kernel's need, µm without a pixel size.
        RasterIOError: the store cannot be read or written.
    """
    store = Path(store)
    ds = zstore.open_store(store)
    if zstore.IMAGE not in ds:
        raise InputError(f"{store} has no image; run `tileseg ingest` first")
    image = ds[zstore.IMAGE].data
    band_names = list(ds[zstore.IMAGE].attrs["band_names"])
    grid = zstore.store_grid(ds)
    valid = apply.any_band_valid(image, ds[zstore.IMAGE].attrs.get("nodata"))
    if cfg.method == "classical":
        kernel = classical_kernel(cfg, band_names, _pixel_size(ds))
        if kernel.threshold is None:
            kernel = with_global_otsu(image, valid, kernel)
            log.info("instances: Otsu threshold of the smoothed signal %.6g (whole image)", kernel.threshold)
        data, need = image, kernel.required_halo
    else:  # U-Net + watershed, or Mask R-CNN (pipeline.learned_instances)
        from pipeline.learned_instances import learned_kernel

        kernel, data, need = learned_kernel(store, image, band_names, ds[zstore.IMAGE].attrs.get("nodata"), cfg,
                                            _pixel_size(ds))  # fmt: skip
    halo = need if cfg.halo is None else cfg.halo
    scratch = store.with_name(f".{store.name}.instances-local.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    chunks = image.chunks[1:]
    try:
        # each chunk task writes its local ranks to the scratch array itself, and the writes
        # finish row by row (strip by strip for the U-Net): memory does not grow with the raster
        zstore.create_scratch(scratch, grid.shape, (chunks[0][0], chunks[1][0]), np.int64)
        chunked = segment_chunks(data, valid, kernel, halo, cfg.merge_iou, writer=zstore.WindowWriter(str(scratch)))
        strips = column_strips(chunks[1], cfg.learned.strip_px) if cfg.method == "unet_watershed" else None
        ((counts, pairs),) = compute(ordered_counts_pairs(chunked, strips), progress=progress, writes=scratch,
                                     label=f"instances: segment chunks (halo {halo} px)")  # fmt: skip
        plan = merge_plan(counts, pairs, chunks)
        local = zstore.open_array(scratch).rechunk(chunks)
        attrs: dict[str, Any] = {
            "n_objects": int(plan.n_objects), "method": cfg.method, "halo_px": int(halo),
            "merge_iou": cfg.merge_iou, "background": 0,
        }  # fmt: skip
        if cfg.method == "classical":
            attrs["threshold"] = float(kernel.threshold)
        else:
            attrs["model"] = str(cfg.learned.model)
        compute(zstore.write_variable(store, zstore.INSTANCES, relabel(local, plan), grid, attrs),
                label=f"instances: relabel {plan.n_objects} objects", progress=progress,
                writes=f"instances in {store}")  # fmt: skip
    except BaseException:
        zstore.discard_partial(store, zstore.INSTANCES)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    zstore.publish_variable(store, zstore.INSTANCES)
    log.info("instances: %d objects (%s) -> %s", plan.n_objects, plan.dtype, store)
    return store


def export_instances(store: Path, out_dir: Path, cfg: InstanceConfig, progress: bool = True,
                     run_config_hash: str | None = None) -> dict[str, Path]:  # fmt: skip
    """Write the store's ``instances`` for viewers: ``instances.ome.zarr`` (OME-Zarr image with
    a multiscale ``labels/instances`` group, for napari and ome-zarr-py) when ``cfg.ome_zarr``
    (default: stores in pixel coordinates, i.e. microscopy), ``instances.tif`` (plain tiled
    TIFF of ids) when ``cfg.label_tiff``, and ``instances_cog.tif`` (a COG with the store's
    CRS) for georeferenced stores. Returns the paths written, by kind. Each records
    ``run_config_hash`` when given (:func:`pipeline.resume.recorded_run`): the OME-Zarr as
    a root attribute, the TIFFs as the tag ``TILESEG_RUN``.

    Raises:
        InputError: the store has no ``instances``.
        RasterIOError: an output cannot be written.
    """
    from pipeline.io.ome import write_label_tiff, write_ome_zarr
    from pipeline.io.raster import write_cog

    ds = zstore.open_store(store)
    if zstore.INSTANCES not in ds:
        raise InputError(f"{store} has no instances; run instance segmentation first")
    ids = ds[zstore.INSTANCES].data
    image = ds[zstore.IMAGE]
    grid = zstore.store_grid(ds)
    pixel = ds.attrs.get("pixel_size_um") or image.attrs.get("pixel_size_um")
    pixel = tuple(float(v) for v in pixel) if pixel else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    tags = {resume.OWNER_TAG: run_config_hash} if run_config_hash else None
    want_ome = cfg.ome_zarr if cfg.ome_zarr is not None else grid.crs_wkt is None
    if want_ome:
        written["ome_zarr"] = write_ome_zarr(
            out_dir / "instances.ome.zarr", image.data, list(image.attrs["band_names"]), pixel, labels=ids,
            label_name="instances", chunk=image.data.chunksize[1], progress=progress,
            attrs={resume.RUN_ATTR: run_config_hash} if run_config_hash else None,
        )  # fmt: skip
    if cfg.label_tiff:
        written["label_tiff"] = write_label_tiff(ids, out_dir / "instances.tif", pixel_size_um=pixel,
                                                 progress=progress, tags=tags)  # fmt: skip
    if grid.crs_wkt is not None:
        blocks = ((w, np.asarray(ids[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width]))
                  for w in _windows(grid, ids.chunksize[0]))  # a generator: one block in memory at a time
        written["cog"] = write_cog(out_dir / "instances_cog.tif", grid, str(ids.dtype), None, blocks,
                                   description="instance ids (0 = background)", tags=tags)  # fmt: skip
    return written


def _windows(grid: Grid, chunk: int):
    from pipeline.grid import iter_windows

    return iter_windows(grid.height, grid.width, chunk)


# --------------------------------------------------------------------------- evaluation
@dataclass
class InstanceEvaluation:
    """Object-level evaluation of a store's ``instances`` (see :mod:`pipeline.object_metrics`).

    Attributes:
        metrics: the metrics at IoU thresholds 0.50 ... 0.95.
        report: the JSON document written to ``report_instances.json``.
        json_path, md_path, html_path: the report files.
    """

    metrics: InstanceMetrics
    report: dict[str, Any]
    json_path: Path
    md_path: Path
    html_path: Path

    def paths(self) -> dict[str, str]:
        return {"instance_report_json": str(self.json_path), "instance_report_md": str(self.md_path),
                "instance_report_html": str(self.html_path)}  # fmt: skip

    def console(self) -> str:
        """A short plain-text summary for the terminal (IoU 0.5 and the mean AP)."""
        r = self.metrics.at(0.5)

        def f(x):
            return "n/a" if x is None else f"{x:.4f}"

        return (
            f"objects: {self.metrics.n_gt} ground truth, {self.metrics.n_pred} predicted\n"
            f"at IoU 0.5: TP {r['tp']}  FP {r['fp']}  FN {r['fn']}  precision {f(r['precision'])}  "
            f"recall {f(r['recall'])}  F1 {f(r['f1'])}  AP {f(r['ap'])}  PQ {f(r['pq'])}\n"
            f"mean AP (IoU 0.50:0.95, Data Science Bowl 2018): {f(self.report['metrics']['mean_ap'])}"
        )


def _ground_truth_ids(path: Path, shape: tuple[int, int], chunks) -> da.Array:
    """The ground-truth instance mask as a (y, x) Dask array chunked like ``chunks``."""
    from pipeline.io import microscopy
    from pipeline.io.raster import raster_info

    if not Path(path).exists():
        from pipeline.errors import MissingFileError

        raise MissingFileError(f"ground-truth instance mask not found: {path}")
    if microscopy.is_microscopy(path):
        info = microscopy.describe_microscopy(path)
        if info.shape[0] != 1:
            raise InputError(f"{path} has {info.shape[0]} channels; an instance mask has one")
        ids = microscopy.read_microscopy(info, [0], max(chunks[0]))[0]
    else:
        info = raster_info(path)
        ids = apply.read_band(str(path), chunks, info.dtype) if info.grid.shape == shape else None
        if ids is None:
            raise InputError(f"ground truth {path} is {info.grid.shape[0]} x {info.grid.shape[1]} px but the image is "
                             f"{shape[0]} x {shape[1]} px; an instance mask must be on the image's grid")  # fmt: skip
    if tuple(ids.shape) != tuple(shape):
        raise InputError(f"ground truth {path} is {ids.shape[0]} x {ids.shape[1]} px but the image is "
                         f"{shape[0]} x {shape[1]} px; an instance mask must be on the image's grid")  # fmt: skip
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"ground truth {path} holds {ids.dtype} values; an instance mask holds integer ids")
    return ids.rechunk(chunks)


def evaluate_instances(store: Path, cfg: InstanceEvaluateConfig, out_dir: Path, progress: bool = True,
                       run_config_hash: str | None = None) -> InstanceEvaluation:  # fmt: skip
    """Object-level metrics of the store's ``instances`` against a ground-truth instance mask.

    Sparse per-chunk counts (segment areas and (ground truth, prediction) intersections)
    are summed over chunks and matched once (:mod:`pipeline.object_metrics`): TP, FP, FN,
    precision, recall, F1, the 2018 Data Science Bowl AP = TP / (TP + FP + FN) at IoU
    thresholds 0.50 ... 0.95, mean matched IoU and panoptic quality. Pixels where the
    ground truth is ``cfg.nodata`` or the image is nodata are left out. Writes
    ``report_instances.json``, ``.md`` and ``.html`` (self-contained) in ``out_dir``
    (atomically, the JSON last).

    Raises:
        InputError: no ``instances`` in the store, a mask on another grid or not of ids.
        RasterIOError: missing or unreadable mask, reports that cannot be written.
    """
    ds = zstore.open_store(store)
    if zstore.INSTANCES not in ds:
        raise InputError(f"{store} has no instances; run instance segmentation first")
    pred = ds[zstore.INSTANCES].data
    gt = _ground_truth_ids(Path(cfg.ground_truth), pred.shape, pred.chunks)
    valid = apply.any_band_valid(ds[zstore.IMAGE].data, ds[zstore.IMAGE].attrs.get("nodata"))
    if cfg.nodata is not None:
        valid = valid & (gt != cfg.nodata)
        gt = da.where(gt == cfg.nodata, 0, gt)
    (counts,) = compute(dask_counts(instance_counts, gt, pred, valid=valid),
                        label="instances: object matching counts", progress=progress)  # fmt: skip
    metrics = instance_metrics(counts)
    doc = {
        "tileseg_version": __version__,
        "kind": "instances",
        "prediction": str(store),
        "ground_truth": files.checksum(cfg.ground_truth),
        "config_hash": run_config_hash,
        "metrics": metrics.to_dict(),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report_instances.json", out_dir / "report_instances.md"
    md = (f"# Object-level evaluation\n\nPrediction: `{store}` (instances)  \nGround truth: `{cfg.ground_truth}`\n\n"
          f"{metrics.markdown()}\n")  # fmt: skip
    from pipeline.report_html import render_instances

    html_path = out_dir / "report_instances.html"
    files.publish_texts([(md_path, md), (html_path, render_instances(doc)),
                         (json_path, json.dumps(doc, indent=2) + "\n")])  # fmt: skip
    return InstanceEvaluation(metrics, doc, json_path, md_path, html_path)


__all__ = ["InstanceEvaluation", "classical_kernel", "evaluate_instances", "export_instances", "segment_instances"]


def ingest_inputs(inputs: list[Path], store: Path, ingest_cfg, microscopy_cfg, progress: bool = True,
                  overwrite: bool = False) -> Path:  # fmt: skip
    """Ingest a run's inputs: one microscopy image (TIFF, OME-TIFF, zarr, OME-Zarr without
    georeferencing) with :func:`pipeline.stages.ingest_microscopy` (always rewritten), anything
    else (GeoTIFF, JPEG2000, VRT, ...) with :func:`pipeline.stages.ingest` (reused when its
    inputs and config are unchanged; ``overwrite`` as there).

    Raises:
        InputError: several inputs of which some are microscopy images.
        Whatever the chosen ingest raises.
    """
    from pipeline import stages
    from pipeline.io.microscopy import is_microscopy

    kinds = [Path(p).exists() and is_microscopy(p) for p in inputs]
    if any(kinds):
        if len(inputs) != 1:
            raise InputError(f"a microscopy run takes one input image (channels inside it); got {len(inputs)}")
        return stages.ingest_microscopy(Path(inputs[0]), store, ingest_cfg, microscopy_cfg, progress)
    return stages.ingest(inputs, store, ingest_cfg, progress, overwrite=overwrite)


# --------------------------------------------------------------------------- panoptic
def _thing_ids(cfg: InstanceConfig, class_names: list[str]) -> list[int]:
    if cfg.thing_classes is None:
        return list(range(len(class_names)))
    unknown = [c for c in cfg.thing_classes if c not in class_names]
    if unknown:
        raise ConfigError(f"instances.thing_classes {unknown} are not classes of the run ({class_names})")
    return [class_names.index(c) for c in cfg.thing_classes]


def panoptic_labels(store: Path, cfg: InstanceConfig, progress: bool = True) -> Path:
    """Store ``labels`` (semantic) + ``instances`` -> ``panoptic`` (component, y, x) uint32:
    component 0 the class id (255 = nodata, as in ``labels``), component 1 the instance id
    where the class is a "thing" (``cfg.thing_classes``; default every class), else 0.

    A pixel's panoptic segment is (class, instance); stuff classes are one segment per
    class (Kirillov et al. 2019, "Panoptic Segmentation"). Written as ``panoptic_partial``
    and renamed at the end.

    Raises:
        InputError: the store lacks ``labels`` or ``instances``.
        ConfigError: thing classes that are not classes of the labels.
    """
    ds = zstore.open_store(store)
    for name in (zstore.LABELS, zstore.INSTANCES):
        if name not in ds:
            raise InputError(f"{store} has no {name}; a panoptic label needs semantic labels and instances")
    labels = ds[zstore.LABELS]
    names = list(labels.attrs.get("class_names") or [])
    things = np.asarray(_thing_ids(cfg, names), dtype=np.int64)
    cls = labels.data.astype(np.uint32)
    inst = ds[zstore.INSTANCES].data.astype(np.uint32)
    is_thing = da.isin(labels.data.astype(np.int64), things)
    panoptic = da.stack([cls, da.where(is_thing, inst, 0).astype(np.uint32)]).rechunk({0: 2})
    attrs = {"components": ["class", "instance"], "class_names": names, "thing_classes": things.tolist(),
             "class_nodata": int(labels.attrs.get("nodata", 255))}  # fmt: skip
    grid = zstore.store_grid(ds)
    try:
        compute(zstore.write_variable(store, zstore.PANOPTIC, panoptic, grid, attrs, ("component", "y", "x")),
                label="panoptic labels", progress=progress, writes=f"panoptic in {store}")  # fmt: skip
    except BaseException:
        zstore.discard_partial(store, zstore.PANOPTIC)
        raise
    zstore.publish_variable(store, zstore.PANOPTIC)
    return Path(store)


def export_panoptic_cog(store: Path, out: Path, progress: bool = True, run_config_hash: str | None = None) -> Path:
    """The store's ``panoptic`` -> a two-band uint32 COG (band 1 class id, band 2 instance id),
    with the store's CRS and transform, from one writer; tagged ``TILESEG_RUN`` with
    ``run_config_hash`` when given.

    Raises:
        InputError: no ``panoptic`` in the store.
        RasterIOError: the COG cannot be written.
    """
    from pipeline.io.raster import write_cog

    ds = zstore.open_store(store)
    if zstore.PANOPTIC not in ds:
        raise InputError(f"{store} has no panoptic labels")
    arr = ds[zstore.PANOPTIC].data
    grid = zstore.store_grid(ds)

    def blocks():
        for w in _windows(grid, arr.chunksize[-1]):
            yield w, np.asarray(arr[:, w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width])

    return write_cog(out, grid, "uint32", None, blocks(), band_descriptions=["class id", "instance id"],
                     tags={resume.OWNER_TAG: run_config_hash} if run_config_hash else None)  # fmt: skip


def evaluate_panoptic(store: Path, semantic_gt, instance_gt: InstanceEvaluateConfig, cfg: InstanceConfig,
                      out_dir: Path, progress: bool = True, run_config_hash: str | None = None):  # fmt: skip
    """Panoptic quality per class of the store's ``panoptic`` against ground truth made of a
    semantic class map (``semantic_gt``, any form :func:`pipeline.evaluation.ground_truth_array`
    reads) and an instance-id mask (``instance_gt``) on the image's grid.

    Segments match within their class at IoU > 0.5; unlabeled ground truth is void (Kirillov
    et al. 2019 void rule); stuff classes (not in ``cfg.thing_classes``) count one segment
    per class. Writes ``report_panoptic.json`` (with ``config_hash``: ``run_config_hash``)
    and ``report_panoptic.md``.

    Returns:
        :class:`pipeline.object_metrics.PanopticMetrics`.
    """
    from pipeline.evaluation import ground_truth_array
    from pipeline.object_metrics import panoptic_counts, panoptic_quality

    ds = zstore.open_store(store)
    if zstore.PANOPTIC not in ds:
        raise InputError(f"{store} has no panoptic labels")
    pan = ds[zstore.PANOPTIC]
    names = list(pan.attrs["class_names"])
    grid = zstore.store_grid(ds)
    chunks = pan.data.chunks[1:]
    gt_class, unlabeled = ground_truth_array(semantic_gt, grid, chunks, names)
    void = len(names) + 1  # never a class id
    gt_class = da.where((gt_class == unlabeled) | (gt_class < 0), void, gt_class).astype(np.int64)
    gt_ids = _ground_truth_ids(Path(instance_gt.ground_truth), pan.shape[1:], chunks).astype(np.int64)
    pred_class = pan.data[0].astype(np.int64)
    pred_class = da.where(pred_class == pan.attrs["class_nodata"], void, pred_class)
    stuff = sorted(set(range(len(names))) - set(pan.attrs["thing_classes"]))
    (counts,) = compute(dask_counts(panoptic_counts, gt_class, gt_ids, pred_class, pan.data[1].astype(np.int64),
                                    void=void, stuff_classes=stuff),
                        label="panoptic: segment matching counts", progress=progress)  # fmt: skip
    metrics = panoptic_quality(counts, stuff)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_id = dict(enumerate(names))
    doc = {"tileseg_version": __version__, "kind": "panoptic", "prediction": str(store), "class_names": names,
           "ground_truth": [files.checksum(semantic_gt.path), files.checksum(instance_gt.ground_truth)],
           "config_hash": run_config_hash, "metrics": metrics.to_dict(by_id)}  # fmt: skip
    md = f"# Panoptic quality\n\nPrediction: `{store}` (panoptic)\n\n{metrics.markdown(by_id)}\n"
    files.publish_texts([(out_dir / "report_panoptic.md", md),
                         (out_dir / "report_panoptic.json", json.dumps(doc, indent=2) + "\n")])  # fmt: skip
    return metrics
