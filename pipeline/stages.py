"""The pipeline stages: ingest, segment, stitch, evaluate.

Each stage takes typed config and paths and returns paths or a result object; this
module and :mod:`pipeline.evaluation` (the evaluate stage, re-exported here) are the
only ones that mix I/O with compute. Per-chunk work runs on whatever Dask
client is current (see :mod:`pipeline.cluster`); no stage imports Prefect.

Every stage is safe to interrupt and repeat (see :mod:`pipeline.resume`): ingest reuses
a store made from the same inputs and config, segment resumes chunk by chunk and does
nothing when its labels are up to date, stitch skips an up-to-date COG, and each refuses
to replace another run's output unless ``overwrite``. Outputs are written under
temporary names and published by a rename (the labels: when every chunk is written).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from tqdm import tqdm


from pipeline import apply, inference, resume
from pipeline.classes import class_colormap
from pipeline.cluster import compute, gpu_workers_present
from pipeline.config import (
    LABEL_NODATA,
    AreaConfig,
    BBox,
    ClassInfo,
    GroundTruthConfig,
    IngestConfig,
    MicroscopyConfig,
    SegmentConfig,
    StitchConfig,
    TrainConfig,
    UNetConfig,
    config_hash,
)
from pipeline.errors import ConfigError, InputError
from pipeline.grid import Grid, iter_windows
from pipeline.io import raster as rio_io
from pipeline.io import store as zstore
from pipeline.nodata import fits, missing, same_nodata
from pipeline.segment.classical import Expression, fit_kmeans, integer_bin_edges, majority_mapping, otsu_threshold

log = logging.getLogger("tileseg")


# --------------------------------------------------------------------------- ingest
def ingest(sources: list[Path], store: Path, cfg: IngestConfig, progress: bool = True,
           overwrite: bool = False) -> Path:  # fmt: skip
    """Rasters -> zarr v3 store with ``image`` (band, y, x), chunked (all bands, T, T).

    All bands are resampled onto one target grid (``cfg.grid``; default the
    finest band's grid) with GDAL's warper, window by window on Dask, so peak memory
    depends on T and the band count, not on the raster size. The store is written
    under a temporary name and renamed onto ``store`` when complete. Its root attribute
    ``tileseg_ingest`` records the inputs (absolute path, size, mtime_ns) and the ingest
    config hash; an existing store with the same record is reused (nothing is read),
    one from the same paths whose files or config changed is re-ingested (see
    :mod:`pipeline.resume`).

    Args:
        overwrite: re-ingest even an up-to-date store, and replace a store made from
            other inputs (refused otherwise).

    Returns:
        ``store``.

    Raises:
        RasterIOError: an input is missing or unreadable, or the store cannot be written.
        InputError: inconsistent inputs (band names, CRS, different nodata values), a nodata
            value outside a band's dtype; ``store`` is not a store or is an input.
        OutputExistsError: ``store`` was ingested from other inputs (and not ``overwrite``).
    """
    bands = rio_io.describe_sources(sources, cfg.band_names)
    grid = rio_io.target_grid(bands, cfg.grid.reference, cfg.grid.resolution, cfg.allow_no_crs)
    nodata = cfg.nodata if cfg.nodata is not None else _common_nodata(bands)
    for b in bands:
        _check_nodata_fits(nodata, b.dtype, f"{Path(b.path).name} ({b.name}, {b.dtype})")
    store = Path(store)
    if store.exists() and not (store / "zarr.json").is_file():
        raise InputError(f"{store} exists and is not a zarr store; refusing to overwrite it (choose another path)")
    if any(store.resolve() == p or store.resolve() in p.parents for p in (Path(x).resolve() for x in sources)):
        raise InputError(f"the store path {store} is (or contains) one of the inputs; choose another path")
    from pipeline.evaluation import check_overlap

    verdict, why = resume.store_verdict(store, sources, cfg)
    if verdict == "same" and not overwrite:
        log.info("store %s is up to date (same inputs, sizes, mtimes and ingest config): reusing it", store)
        return store
    if verdict == "other" and not overwrite:
        raise resume.refuse_store(store, why)
    if verdict is not None:
        log.info("re-ingesting %s: %s", store, why or "--overwrite")
    for b in {b.path: b for b in bands}.values():  # a band entirely off the grid would read as all nodata
        check_overlap(grid, b.grid.bounds(), b.grid.crs_wkt, f"input {b.path}", "the target grid")
    image = apply.read_image(bands, grid, cfg.chunk_size, cfg.grid.resampling, nodata, where=f"ingest -> {store}",
                             session=uuid.uuid4().hex)  # fmt: skip
    ds = zstore.image_dataset(image, grid, [b.name for b in bands], nodata)
    ds.attrs[resume.MANIFEST_ATTR] = resume.ingest_manifest(sources, cfg)
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{store.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        compute(zstore.write_image(ds, tmp, cfg.chunk_size), label=f"ingest -> {store}", progress=progress,
                writes=store)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    zstore.publish_dir(tmp, store)
    log.info("ingested %d bands, %d x %d px -> %s", len(bands), grid.width, grid.height, store)
    return store


def _check_nodata_fits(nodata: float | None, dtype: str, what: str) -> None:
    """Raises InputError when ``nodata`` cannot occur in ``dtype`` (:func:`pipeline.nodata.fits`)."""
    if nodata is not None and not fits(nodata, dtype):
        raise InputError(f"nodata {nodata:g} cannot occur in {what}; set ingest.nodata to a value of its range")


def _common_nodata(bands: list[rio_io.BandSource]) -> float | None:
    """The inputs' nodata value: the one every band that declares a nodata value declares
    (NaN equals NaN here). Bands without one take it too (logged): outside their extent the
    store holds it, and their own pixels of that value count as missing.

    Raises:
        InputError: bands declare different values (the store has one nodata value).
    """
    declared: list[tuple[float, str]] = []
    for b in bands:
        if b.nodata is not None and not any(same_nodata(b.nodata, v) for v, _ in declared):
            declared.append((b.nodata, Path(b.path).name))
    if not declared:
        return None
    if len(declared) > 1:
        found = ", ".join(f"{v:g} ({name})" for v, name in declared)
        raise InputError(f"the inputs declare different nodata values: {found}; set ingest.nodata to the value "
                         "that marks missing pixels")  # fmt: skip
    value = declared[0][0]
    undeclared = sorted({Path(b.path).name for b in bands if b.nodata is None})
    if undeclared:
        log.warning("%s declare(s) no nodata value; using %g, the other inputs' (set ingest.nodata to choose)",
                    ", ".join(undeclared), value)  # fmt: skip
    return value


def ingest_microscopy(
    source: Path,
    store: Path,
    cfg: IngestConfig,
    mcfg: MicroscopyConfig | None = None,
    progress: bool = True,
) -> Path:
    """A microscopy image (TIFF, BigTIFF, OME-TIFF, zarr, OME-Zarr) -> the same zarr v3 store as
    :func:`ingest`: ``image`` (band, y, x), chunked (bands, T, T), in pixel coordinates.

    The grid has no CRS and the identity transform (x = column, y = row, pixel centres at
    +0.5), so every stage works in pixels. The physical pixel size (y, x) in micrometres
    (``mcfg.pixel_size_um``, else the file's OME / NGFF metadata) is kept as the attribute
    ``pixel_size_um`` of the store and of ``image``; it is absent when unknown. Channels are
    chosen by ``mcfg.channels`` (names or indices) and named by the file's channel names,
    or by ``cfg.band_names`` when given. ``cfg.chunk_size`` and ``cfg.nodata`` apply;
    ``cfg.grid`` does not (there is no resampling). Pixels are read block by block on Dask
    (see :mod:`pipeline.io.microscopy`) and the store is published atomically.

    Returns:
        ``store``.

    Raises:
        RasterIOError: missing or unreadable input, or the store cannot be written.
        InputError: not a 2D image (Z / T > 1), unknown channels, a bad store path.
        ConfigError: ``cfg.grid`` options, or ``cfg.band_names`` of the wrong length.
    """
    from affine import Affine

    from pipeline.io import microscopy

    mcfg = mcfg or MicroscopyConfig()
    if cfg.grid.reference is not None or cfg.grid.resolution is not None:
        raise ConfigError("ingest.grid does not apply to microscopy inputs (no resampling); remove it")
    info = microscopy.describe_microscopy(source, mcfg.axes)
    idx = microscopy.select_channels(info, mcfg.channels)
    names = [info.channel_names[i] for i in idx]
    if cfg.band_names is not None:
        if len(cfg.band_names) != len(idx):
            raise ConfigError(f"ingest.band_names has {len(cfg.band_names)} names for {len(idx)} channels {names}")
        names = list(cfg.band_names)
    image = microscopy.read_microscopy(info, idx, cfg.chunk_size)
    grid = Grid(None, Affine.identity(), info.shape[1], info.shape[2])
    pixel_size = mcfg.pixel_size_yx() or info.pixel_size_um
    nodata = cfg.nodata if cfg.nodata is not None else info.nodata
    _check_nodata_fits(nodata, info.dtype, f"{Path(source).name} ({info.dtype})")
    ds = zstore.image_dataset(image, grid, names, nodata)
    if pixel_size is not None:
        ds.attrs["pixel_size_um"] = ds[zstore.IMAGE].attrs["pixel_size_um"] = [float(v) for v in pixel_size]
    ds.attrs["source"] = str(source)
    _write_new_store(ds, Path(store), [Path(source)], cfg.chunk_size, progress)
    size = f"pixel size {' x '.join(f'{v:g}' for v in pixel_size)} um (y, x)" if pixel_size else "pixel size unknown"
    log.info("ingested %d channels %s, %d x %d px (%s) -> %s", len(names), names, grid.width, grid.height, size,
             store)  # fmt: skip
    return Path(store)


def _write_new_store(ds, store: Path, sources: list[Path], chunk: int, progress: bool) -> None:
    """Write an image Dataset to a temporary store next to ``store`` and rename it onto ``store``.

    Raises:
        InputError: ``store`` exists and is not a zarr store, or is (or holds) an input.
    """
    if store.exists() and not (store / "zarr.json").is_file():
        raise InputError(f"{store} exists and is not a zarr store; refusing to overwrite it (choose another path)")
    if any(store.resolve() == p or store.resolve() in p.parents for p in (x.resolve() for x in sources)):
        raise InputError(f"the store path {store} is (or contains) one of the inputs; choose another path")
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f".{store.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        compute(zstore.write_image(ds, tmp, chunk), label=f"ingest -> {store}", progress=progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    zstore.publish_dir(tmp, store)


# --------------------------------------------------------------------------- segment
def _gt_array(gt: GroundTruthConfig, grid: Grid, chunks, class_names: list[str]):
    """Lazy ground truth on the store's ``grid`` and its unlabeled value (see
    :func:`pipeline.evaluation.ground_truth_array`)."""
    from pipeline.evaluation import ground_truth_array

    return ground_truth_array(gt, grid, chunks, class_names, target="the image")


def segment(
    store: Path,
    cfg: SegmentConfig,
    classes: list[ClassInfo] | None = None,
    ground_truth: GroundTruthConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Segmentation of the store's ``image`` into ``labels`` (y, x), uint8.

    Methods: ``threshold`` (band or index expression; fixed value or Otsu on the
    whole-raster histogram), ``kmeans`` (fitted once on a seeded sample of the whole
    raster, optionally mapped to classes by majority vote in a training area) and
    ``unet`` (a saved model applied on overlapping windows of one global grid, softmax
    probabilities blended with a window function; see :mod:`pipeline.blend`).
    ``labels`` is ``LABEL_NODATA`` (255) where any band used is nodata (for ``unet``:
    where all its bands are). The result does not depend on the chunking of the store.

    Resumable (see :mod:`pipeline.resume`): the global parameters (Otsu threshold, k-means
    fit) are computed first; with them the *segment key* is known. ``labels`` with that key
    are up to date and nothing is done. Otherwise each chunk task writes its chunk into
    ``labels_partial`` and then a completion marker; a rerun with the same key computes
    only the chunks without a marker, and another key starts ``labels_partial`` afresh.
    ``labels_partial`` replaces ``labels`` when every chunk is written, so a failed or
    killed run leaves earlier labels intact (and its finished chunks for the next run).

    Args:
        overwrite: recompute every chunk, even of up-to-date labels or a resumable run.

    Returns:
        ``store``.

    Raises:
        InputError, ConfigError: unknown bands, no valid pixels, inconsistent options, ``method`` none.
        TilesegError: an error inside a chunk task, naming the chunk (see :class:`pipeline.apply.in_chunk`).
    """
    store = Path(store)
    if cfg.method == "none":
        raise ConfigError("segment.method is 'none' (an instance-only config): set segment.method to threshold, "
                          "kmeans or unet, or run the instances with `tileseg run CONFIG`")
    ds = zstore.open_store(store)
    if zstore.IMAGE not in ds:
        raise InputError(f"{store} has no image; run `tileseg ingest` first")
    where = f"segment ({cfg.method}) of {store}"
    img = ds[zstore.IMAGE]

    def read_image(bands: list[int] | None = None):  # the store's image, or only the bands a method uses
        return apply.read_store_image(str(store), img.shape, img.data.chunks, img.dtype, where, bands)

    image = read_image()
    band_names = list(img.attrs["band_names"])
    nodata = img.attrs.get("nodata")
    grid = zstore.store_grid(ds)
    attrs: dict = {"nodata": LABEL_NODATA, "method": cfg.method}
    class_names = [c.name for c in classes or []]

    probabilities = None
    if cfg.method == "unet":
        labels, probabilities, extra, class_names = _unet_labels(store, image, band_names, nodata, cfg.unet,
                                                                 class_names, where)  # fmt: skip
        attrs.update(extra)
    elif cfg.method == "threshold":
        tc = cfg.threshold
        expr = Expression.parse(tc.expression, band_names)
        image = read_image([band_names.index(n) for n in expr.names])  # the tasks hold only these bands
        index = apply.IndexKernel(expr, list(expr.names), nodata)  # one task per chunk and pass (see apply)
        if tc.value is None:
            # a bare 8/16-bit band: one bin per value, no range pass (classical.integer_bin_edges)
            edges = integer_bin_edges(image.dtype) if expr.band else None
            if edges is None:
                (ranges,) = compute(apply.index_range(image, index, where), label="otsu: value range",
                                    progress=progress)  # fmt: skip
                ranges = np.asarray(ranges)
                if np.isnan(ranges[..., 0]).all():
                    raise _no_valid_value(tc.expression)
                lo, hi = float(np.nanmin(ranges[..., 0])), float(np.nanmax(ranges[..., 1]))
                if hi <= lo:
                    raise _constant_index(tc.expression, lo)
                edges = np.linspace(lo, hi, tc.bins + 1)
            (counts,) = compute(apply.index_histogram(image, index, edges, where), label="otsu: histogram",
                                progress=progress)  # fmt: skip
            filled = np.flatnonzero(counts)
            if filled.size == 0:
                raise _no_valid_value(tc.expression)
            if filled.size == 1:  # (integer bins only: otherwise hi > lo fills two bins)
                raise _constant_index(tc.expression, edges[filled[0]] + 0.5)
            threshold = otsu_threshold(np.asarray(counts), edges)
            log.info("Otsu threshold of %s: %.6g", tc.expression, threshold)
        else:
            threshold = tc.value
        labels = apply.index_labels(image, index, threshold, LABEL_NODATA, where)
        attrs.update(expression=tc.expression, threshold=threshold, otsu=tc.value is None)
        if not class_names:
            class_names = ["below", "above"]
        elif len(class_names) > 2:
            log.warning("threshold writes classes 0 (below) and 1 (above), here named %r and %r; the other %d "
                        "classes never appear (an evaluation against them scores only these two)",
                        class_names[0], class_names[1], len(class_names) - 2)  # fmt: skip
    else:
        kc = cfg.kmeans
        feats = kc.bands or band_names
        missing = [b for b in feats if b not in band_names]
        if missing:
            raise InputError(f"segment.kmeans.bands {missing} are not in the raster; bands are {band_names}")
        image = read_image([band_names.index(b) for b in feats])  # only the features' bands
        idx = list(range(len(feats)))
        valid = apply.valid_mask(image, idx, nodata)
        rows, cols = apply.sample_pixels(image, kc.sample_size, kc.seed)
        vals, ok = compute(
            apply.gather_pixels(image[idx], rows, cols),
            apply.gather_pixels(valid[None], rows, cols)[:, 0],
            label="kmeans: sampling",
            progress=progress,
        )
        samples = np.asarray(vals)[np.asarray(ok)]
        fit_id = resume.kmeans_fit_id(samples, kc.n_clusters, kc.seed)
        model = None if overwrite else resume.earlier_kmeans_fit(store, fit_id)
        if model is None:
            log.info("kmeans: fitting %d clusters on %d sampled pixels of %d bands (scikit-learn, one thread)",
                     kc.n_clusters, len(samples), len(feats))  # fmt: skip
            model = fit_kmeans(samples, kc.n_clusters, kc.seed)
        else:
            log.info("kmeans: the labels in %s were fitted on the same sample: their fit is reused", store)
        mapping = None
        if kc.map_to_classes:
            assert ground_truth is not None and kc.train_area is not None  # checked by RunConfig
            clusters = apply.kmeans_labels(image, idx, model, valid, LABEL_NODATA, where=where)
            gt, gt_nodata = _gt_array(ground_truth, grid, clusters.chunks, class_names)
            area = apply.area_mask(grid, clusters.chunks, _bbox(kc.train_area))
            size = max(kc.n_clusters, len(class_names))
            (counts,) = compute(
                apply.confusion(clusters, gt, size, LABEL_NODATA, gt_nodata, area),
                label="kmeans: majority vote in the training area",
                progress=progress,
            )
            contingency = np.asarray(counts)[: size * size].reshape(size, size)[: kc.n_clusters, : len(class_names)]
            mapping = majority_mapping(contingency, model.centroids)
            attrs["cluster_to_class"] = mapping.tolist()
            log.info("cluster -> class: %s", {k: class_names[c] for k, c in enumerate(mapping)})
        labels = apply.kmeans_labels(image, idx, model, valid, LABEL_NODATA, mapping, where)
        attrs.update(bands=feats, centroids=model.centroids.tolist(), kmeans_mean=model.mean.tolist(),
                     kmeans_std=model.std.tolist(), seed=kc.seed)  # fmt: skip
        attrs[resume.KMEANS_FIT] = fit_id
        if mapping is None:  # cluster ids, not classes: named as clusters whatever `classes` says
            if class_names:
                log.warning("kmeans without map_to_classes writes cluster ids 0..%d, not classes: the labels are "
                            "named cluster_0.., not %s (segment.kmeans.map_to_classes with a train_area maps "
                            "them)", kc.n_clusters - 1, class_names)  # fmt: skip
            class_names = [f"cluster_{k}" for k in range(kc.n_clusters)]
    attrs["class_names"] = class_names
    resume.write_labels(store, cfg, labels, probabilities, grid, attrs, where, progress, overwrite)
    return store


def _no_valid_value(expression: str) -> InputError:
    return InputError(f"no valid value of {expression!r}: every pixel is nodata, or the expression is NaN or "
                      "infinite there (a division by zero?)")  # fmt: skip


def _constant_index(expression: str, value: float) -> InputError:
    return InputError(f"every valid pixel of {expression!r} is {float(value):g}: Otsu needs two values; "
                      "set segment.threshold.value")  # fmt: skip


def _unet_labels(store: Path, image, band_names, nodata, cfg: UNetConfig, class_names: list[str], where: str):
    """Lazy labels and probabilities of the U-Net path, plus label attributes and class names.

    When the Dask cluster has workers with a ``GPU`` resource (see :mod:`pipeline.cluster`),
    the inference tasks ask for one (``resources={"GPU": 1}``; :mod:`pipeline.inference`), so they run
    one at a time per GPU worker while CPU work goes anywhere.
    """
    from pipeline.blend import WindowGrid
    from pipeline.segment.unet import check_bands, describe, load_spec, resolve_device

    assert cfg.model is not None  # checked by SegmentConfig
    spec = load_spec(cfg.model)
    if spec.arch == "maskrcnn":
        raise InputError(f"{cfg.model} is a Mask R-CNN (instances, not class probabilities); use an instance method")
    band_idx = check_bands(spec, band_names)
    if class_names and class_names != spec.classes:
        raise InputError(f"config classes {class_names} differ from the model's classes {spec.classes}")
    wgrid = WindowGrid.from_overlap(cfg.window, cfg.overlap, spec.divisor, cfg.placement)
    device = resolve_device(cfg.device)
    log.info("U-Net %s on %s: window %d, stride %d, %s blending", describe(spec), device, wgrid.window,
             wgrid.stride, cfg.blend)  # fmt: skip
    gpu = gpu_workers_present()
    if gpu:
        log.info("U-Net inference tasks ask for a GPU worker (resource GPU=1)")
    probs = inference.unet_probabilities(str(store), image, band_idx, wgrid, cfg.blend, str(cfg.model), device,
                                         cfg.batch_size, nodata, len(spec.classes), where, gpu=gpu,
                                         strip_px=cfg.strip_px, compile=cfg.compile)  # fmt: skip
    labels = apply.argmax_valid_labels(probs, LABEL_NODATA, where)  # the last channel is the validity
    probs = probs[:-1]
    attrs = {"model": str(cfg.model), "window": wgrid.window, "stride": wgrid.stride, "blend": cfg.blend}
    out_probs = probs.astype(np.float16) if cfg.probabilities else None
    return labels, out_probs, attrs, list(spec.classes)


def _bbox(b: BBox) -> tuple[float, float, float, float]:
    return (b.xmin, b.ymin, b.xmax, b.ymax)


# --------------------------------------------------------------------------- stitch
def stitch(store: Path, out: Path, cfg: StitchConfig, classes: list[ClassInfo] | None = None,
           progress: bool = True, run_key: str | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Store ``labels`` -> single-band Cloud-Optimized GeoTIFF.

    Tiled (``cfg.blocksize``), compressed, internal overviews resampled with NEAREST
    or MODE, an embedded colour table (one colour per class, nodata transparent), the
    nodata tag, class names in the ``CLASS_NAMES`` tag, and exactly the store's CRS,
    transform and shape. One process writes the file (design note), reading the store
    chunk by chunk; the file appears under its name only when complete.

    The COG records the run that wrote it (tag ``TILESEG_RUN``: ``run_key``, by default a
    hash of ``cfg`` and ``classes``) and the segment key of its labels (``TILESEG_LABELS``).
    An existing COG of the same run showing the same labels is up to date and kept; one of
    the same run with other labels is replaced; one of another run is refused.

    Args:
        run_key: identity of the run (the run config hash, for the flow and the CLI).
        overwrite: replace the COG even when up to date or written by another run.

    Raises:
        InputError: the store has no labels (run segment first), ``out`` is a directory.
        RasterIOError: the COG cannot be written.
        OutputExistsError: ``out`` belongs to another run (and not ``overwrite``).
    """
    if Path(out).is_dir():
        raise InputError(f"{out} is a directory; give the COG's file name (for example {Path(out) / 'labels.tif'})")
    ds = zstore.open_store(store)
    if zstore.LABELS not in ds:
        raise InputError(f"{store} has no labels; run `tileseg segment {store}` first")
    labels = ds[zstore.LABELS]
    owner = run_key or config_hash({"stitch": cfg.model_dump(mode="json"),
                                    "classes": [c.model_dump(mode="json") for c in classes or []]})  # fmt: skip
    labels_key = labels.attrs.get(zstore.SEGMENT_KEY)
    if resume.cog_state(Path(out), owner, labels_key, overwrite) == "current":
        log.info("%s is up to date (same run, same labels): nothing to do", out)
        return Path(out)
    grid = zstore.store_grid(ds)
    class_names = list(labels.attrs.get("class_names") or [c.name for c in classes or []])
    nodata = labels.attrs.get("nodata", LABEL_NODATA)
    chunk = labels.data.chunksize[0]
    windows = list(iter_windows(grid.height, grid.width, chunk))
    bar = tqdm(total=len(windows), desc=f"stitch -> {Path(out).name}", unit="chunk", disable=not progress)

    tags = {resume.OWNER_TAG: owner, **({resume.LABELS_TAG: labels_key} if labels_key else {})}
    try:
        rio_io.write_cog(
            out, grid, str(labels.dtype), nodata, zstore.iter_blocks(store, zstore.LABELS, windows),
            colormap=class_colormap(class_names, classes) if labels.dtype == np.uint8 else None,
            class_names=class_names, blocksize=cfg.blocksize, compress=cfg.compress, level=cfg.level,
            overview_resampling=cfg.overview_resampling, on_block=lambda: bar.update(1), tags=tags,
        )  # fmt: skip
    finally:
        bar.close()
    return Path(out)


def export_ome_zarr(store: Path, out: Path, label_name: str = "labels", progress: bool = True) -> Path:
    """Store ``image`` (and ``labels`` when present) -> OME-Zarr (NGFF 0.5) pyramids, for viewers
    such as napari or the OME-Zarr tools (see :func:`pipeline.io.ome.write_ome_zarr`).

    Channel names are the store's band names; scales are in micrometres when the store has
    ``pixel_size_um`` (a microscopy ingest), else in pixels. Chunks follow the store's.

    Raises:
        RasterIOError, InputError: the store cannot be read, or the output cannot be written.
    """
    from pipeline.io.ome import write_ome_zarr

    ds = zstore.open_store(store)
    if zstore.IMAGE not in ds:
        raise InputError(f"{store} has no image; an OME-Zarr export needs one")
    image = ds[zstore.IMAGE]
    pixel = ds.attrs.get("pixel_size_um") or image.attrs.get("pixel_size_um")
    labels = ds[zstore.LABELS].data if zstore.LABELS in ds else None
    return write_ome_zarr(
        out, image.data, list(image.attrs["band_names"]), tuple(pixel) if pixel else None, labels=labels,
        label_name=label_name, chunk=image.data.chunksize[1], progress=progress,
    )  # fmt: skip


# --------------------------------------------------------------------------- evaluate
# The evaluate stage lives in pipeline/evaluation.py (this module would pass ~600 lines);
# it is re-exported here so that every stage is `pipeline.stages.<name>`.
from pipeline.evaluation import EvaluationResult, evaluate  # noqa: E402


# --------------------------------------------------------------------------- train
def _read_chips(image, gt, gt_nodata: int, nodata, grid: Grid, area: AreaConfig, tile: int, stride: int,
                progress: bool, label: str, to_target=None, ignore: int | None = None,
                class_names: list[str] | None = None):  # fmt: skip
    """Chips of ``tile`` px every ``stride`` px inside ``area`` (a bbox, polygons or a mask);
    labels outside the area are ignored, and chips without a labeled pixel are skipped.

    The window spanned by the area (not the raster) is read into memory. ``to_target``,
    if given, maps the whole window's ground truth ``(values (y, x) int64, unlabeled (y, x)
    bool)`` to the training target before it is cut into chips (so targets such as object
    outlines see whole objects, not chip-cut ones). Unlabeled pixels become ``ignore``
    (default: the loss's ignore value, 255).

    Raises:
        InputError: with ``class_names``, labeled pixels whose value is not a class id
            (0 .. len(class_names) - 1); the area is smaller than one chip.
    """
    from pipeline.evaluation import area_mask_and_window
    from pipeline.segment.training import IGNORE, Chips

    mask, window = area_mask_and_window(area, grid, image.chunks[1:], role=f"{label} area")
    rs = slice(int(window.row_off), int(window.row_off + window.height))
    cs = slice(int(window.col_off), int(window.col_off + window.width))
    parts = [image[:, rs, cs], gt[rs, cs]] + ([mask[rs, cs]] if mask is not None else [])
    got = compute(*parts, label=f"train: reading the {label} area", progress=progress)
    img, lab = np.asarray(got[0]), np.asarray(got[1]).astype(np.int64)
    inside = np.asarray(got[2]) if mask is not None else np.ones(lab.shape, bool)
    valid = ~missing(img, nodata).all(axis=0)
    ignore = IGNORE if ignore is None else ignore
    unlabeled = (lab == gt_nodata) | ~valid | ~inside
    if class_names is not None:
        stray = ~unlabeled & ((lab < 0) | (lab >= len(class_names)))
        if stray.any():
            values = np.unique(lab[stray])
            raise InputError(
                f"{int(stray.sum())} labeled pixels of the {label} area have values {values[:8].tolist()} that are not "
                f"class ids 0..{len(class_names) - 1} of the classes {class_names}: give one class per id, or map "
                "the values with evaluate.ground_truth.class_map (VALUE: CLASS)"
            )
    if to_target is not None:
        lab = to_target(lab, unlabeled)
    lab[unlabeled] = ignore
    h, w = lab.shape
    if h < tile or w < tile:
        raise InputError(f"the {label} area is {w} x {h} px, smaller than one {tile} px chip")
    origins = [(r, c) for r in range(0, h - tile + 1, stride) for c in range(0, w - tile + 1, stride)]
    keep = [(r, c) for r, c in origins if (lab[r : r + tile, c : c + tile] != ignore).any()]
    log.info("%s area: %d of %d chips hold labeled pixels", label, len(keep), len(origins))
    pick = lambda a, r, c: a[..., r : r + tile, c : c + tile]  # noqa: E731
    return Chips(
        np.stack([pick(img, r, c) for r, c in keep]) if keep else np.zeros((0, img.shape[0], tile, tile)),
        np.stack([pick(lab, r, c) for r, c in keep]) if keep else np.zeros((0, tile, tile), np.int64),
        np.stack([pick(valid, r, c) for r, c in keep]) if keep else np.zeros((0, tile, tile), bool),
    )


def train(store: Path, cfg: TrainConfig, ground_truth: GroundTruthConfig, classes: list[ClassInfo],
          progress: bool = True) -> Path:  # fmt: skip
    """Train a segmentation model on the store's ``image`` against ground truth; save it.

    Chips of ``cfg.tile`` px are cut every ``cfg.stride`` px inside ``cfg.train_area``
    (chips without labeled pixels are skipped) and every ``cfg.tile`` px inside
    ``cfg.val_area``. Band statistics for normalisation come from the training chips.
    The model with the best validation mIoU is saved to ``cfg.out`` (.safetensors + .json),
    with a per-epoch log beside it (``.log.jsonl``).

    Returns:
        the .safetensors path.

    Raises:
        InputError: unknown bands, no classes, empty areas.
    """
    import time

    import torch

    from pipeline import __version__
    from pipeline.segment import training
    from pipeline.segment.unet import ModelSpec, build_model, normalise, resolve_device, save_model

    ds = zstore.open_store(store)
    image = ds[zstore.IMAGE].data
    band_names = list(ds[zstore.IMAGE].attrs["band_names"])
    nodata = ds[zstore.IMAGE].attrs.get("nodata")
    grid = zstore.store_grid(ds)
    bands = cfg.bands or band_names
    missing = [b for b in bands if b not in band_names]
    if missing:
        raise InputError(f"train.bands {missing} are not in the raster; bands are {band_names}")
    class_names = [c.name for c in classes]
    to_target, ignore = None, None
    if cfg.target == "instance_boundary" or cfg.arch == "maskrcnn":
        from pipeline.learned_instances import check_instance_ground_truth

        check_instance_ground_truth(ground_truth)
        if cfg.arch == "maskrcnn":  # ids stay ids; unlabeled -1 (background for Mask R-CNN)
            from pipeline.segment.maskrcnn import CLASSES as class_names

            ignore = -1
        else:
            from pipeline.segment.instance_unet import INSTANCE_CLASSES as class_names
            from pipeline.segment.instance_unet import boundary_targets as to_target
        if classes:
            log.info("instance training: the config's classes are not used; the model's classes are %s", class_names)
    if not class_names:
        raise InputError("training needs `classes` in the config")
    image = image[[band_names.index(b) for b in bands]]
    gt, gt_nodata = _gt_array(ground_truth, grid, image.chunks[1:], class_names)
    ids = list(class_names) if to_target is None and ignore is None else None  # semantic: values are class ids

    def chips(area: AreaConfig, stride: int, label: str) -> training.Chips:
        return _read_chips(image, gt, gt_nodata, nodata, grid, area, cfg.tile, stride, progress, label, to_target,
                           ignore, ids)  # fmt: skip

    tr = chips(cfg.train_area, cfg.stride, "training")
    if len(tr) == 0:
        raise InputError("no training chip holds a labeled pixel; check train.train_area and the ground truth "
                         "(its nodata, its classes) there")  # fmt: skip
    va = chips(cfg.val_area, cfg.tile, "validation")
    if len(va) == 0:
        raise InputError("no validation chip holds a labeled pixel, so no epoch could be chosen; check "
                         "train.val_area and the ground truth there")  # fmt: skip
    mean, std = training.band_statistics(tr, nodata)
    spec = ModelSpec(
        arch=cfg.arch, encoder=cfg.encoder, encoder_depth=cfg.encoder_depth, decoder_channels=cfg.decoder_channels,
        bands=bands, mean=mean, std=std, classes=list(class_names), tile_size=cfg.tile, halo=0,
        tileseg_version=__version__, target="instances" if cfg.arch == "maskrcnn" else cfg.target,
        anchor_sizes=cfg.maskrcnn.anchor_sizes if cfg.arch == "maskrcnn" else None,
    )  # fmt: skip
    device = resolve_device(cfg.device)
    out = Path(cfg.out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    # the epoch log goes to NAME.partial.log.jsonl, renamed onto NAME.log.jsonl with the saved
    # model: an interrupted training leaves the previous model and its log as they were
    final_log, log_path = out.with_suffix(".log.jsonl"), out.with_suffix(".partial.log.jsonl")
    log_path.unlink(missing_ok=True)

    def saved(model: Path) -> Path:
        if log_path.exists():
            os.replace(log_path, final_log)
        return model

    t0 = time.perf_counter()
    if cfg.arch == "maskrcnn":
        from pipeline.learned_instances import train_maskrcnn_stage

        return saved(train_maskrcnn_stage(spec, tr, va, cfg, ground_truth, device, out, log_path, progress))

    def fit(chips, val, epochs: int, patience: int):
        torch.manual_seed(cfg.seed)  # the random initial weights are part of a seeded run
        return training.train(
            build_model(spec, cfg.encoder_weights), lambda im, v: normalise(im, spec, v, nodata), chips, val,
            len(class_names), epochs=epochs, patience=patience, batch_size=cfg.batch_size, lr=cfg.lr,
            weight_decay=cfg.weight_decay, loss=cfg.loss, weighting=cfg.class_weighting, schedule=cfg.lr_schedule,
            jitter=cfg.spectral_jitter, seed=cfg.seed, device=device, log_path=log_path, progress=progress,
        )  # fmt: skip

    result = fit(tr, va, cfg.epochs, cfg.patience)
    refit_epochs = None
    if cfg.refit:
        # the validation area has chosen the epoch count; now learn from its labels too
        va_train = chips(cfg.val_area, cfg.stride, "validation (refit)")
        both = training.Chips(*(np.concatenate([getattr(tr, f), getattr(va_train, f)])
                                for f in ("images", "labels", "valid")))  # fmt: skip
        empty = training.Chips(both.images[:0], both.labels[:0], both.valid[:0])
        refit_epochs = result.best_epoch
        log.info("refit on %d training + validation chips for %d epochs", len(both), refit_epochs)
        refit = fit(both, empty, refit_epochs, refit_epochs)
        result.net = refit.net
        result.history += refit.history
    spec.trained = {
        "config": cfg.model_dump(mode="json"),
        "ground_truth": str(ground_truth.path),
        "train_chips": len(tr),
        "val_chips": len(va),
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "refit_epochs": refit_epochs,
        "best_val_miou": round(result.best_val_miou, 6),
        "device": device,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("best validation mIoU %.4f at epoch %d", result.best_val_miou, result.best_epoch)
    return saved(save_model(result.net.cpu(), spec, out))


__all__ = ["ingest", "ingest_microscopy", "segment", "stitch", "export_ome_zarr", "evaluate", "train", "EvaluationResult"]
