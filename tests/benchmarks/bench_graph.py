"""Benchmark: Dask graph size of tileseg's stages on a 100,000 x 100,000 px raster (issue 7).

"No graph with one task per tiny chunk; check that a 100,000 x 100,000 raster's graph builds
quickly and small." Nothing is computed and no 100k x 100k pixels are written anywhere:

- The input is a GDAL VRT (XML, written here, :func:`write_mosaic_vrt`) that repeats the
  4-band uint8 scene GeoTIFF (:func:`tests.benchmarks.harness.write_scene_geotiff`, ``--tile``
  px) side by side up to ``--size`` px, on the scene's grid extended east and south.
- For each chunk size (``--chunks``, default 512, 1024, 2048) the lazy Dask collections that
  the stages would compute are built, exactly as the stages build them:

  - ``ingest``: ``apply.read_image`` of the VRT's bands + ``store.write_image`` (xarray's
    ``to_zarr(compute=False)``; this writes the store's metadata and coordinates only, into a
    temporary folder);
  - ``segment_histogram`` / ``segment_labels``: the threshold (Otsu) passes on B08,
    ``apply.index_histogram`` and ``apply.index_labels`` over ``apply.read_store_image`` of a
    store path that is never read;
  - ``segment_write``: ``apply.write_chunks`` of those labels (what ``segment`` computes,
    through ``apply.chunk_tasks``, which adds one task per row of chunks);
  - ``unet_probabilities`` / ``unet_labels``: ``inference.unet_probabilities`` (committed model,
    window 256, overlap 0.25) and the argmax labels with their validity mask
    (:func:`unet_graphs`, kept apart because that signature is about to change), over a 10-band
    uint16 image of the same size.

For each graph: the number of tasks of the materialised graph (``dict(graph)``) and per
chunk, the number of layers, the seconds to build the collection and to materialise its
graph, the tasks after Dask's own optimisation (what the threaded scheduler runs) and, unless
``--no-pickle``, the size in MB of the cloudpickled task dict and the time to pickle it.

Prints one JSON line and appends it to ``--results``.

Usage: python tests/benchmarks/bench_graph.py [--size 100000] [--chunks 512,1024,2048] [--tile 2048]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks import harness  # noqa: E402

MODEL = str(harness.REPO / "models" / "eobox-unet.safetensors")
GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}


def write_mosaic_vrt(path: str | Path, tile: str | Path, size: int) -> Path:
    """A ``size`` x ``size`` px GDAL VRT repeating the raster ``tile`` side by side (no mirroring).

    The VRT has ``tile``'s bands, band descriptions, data type, CRS, origin and pixel size;
    copy (i, j) of the tile starts at pixel row ``i * tile_height``, column ``j * tile_width``
    (copies at the east and south edges are cut). Each band has one ``SimpleSource`` per copy
    (with ``SourceProperties``, so GDAL need not open the tile to open the VRT). The tile is
    referenced by its absolute path. Nothing but the XML is written.

    Returns:
        ``path``.

    Raises:
        ValueError: ``tile`` is rotated (the VRT geotransform would be wrong).
    """
    import rasterio

    path, tile = Path(path), Path(tile).resolve()
    with rasterio.open(tile) as src:
        if src.transform.b or src.transform.d:
            raise ValueError(f"{tile} has a rotated transform; only north-up tiles can be mosaicked")
        th, tw, count = src.height, src.width, src.count
        dtype, names, crs, t = src.dtypes[0], src.descriptions, src.crs, src.transform
        bx, by = src.block_shapes[0][1], src.block_shapes[0][0]
    gtype = GDAL_TYPES[dtype]
    copies = [(r0, c0) for r0 in range(0, size, th) for c0 in range(0, size, tw)]
    lines = [f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}">']
    if crs is not None:
        lines.append(f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(crs.to_wkt())}</SRS>')
    lines.append(f"  <GeoTransform>{t.c!r}, {t.a!r}, 0.0, {t.f!r}, 0.0, {t.e!r}</GeoTransform>")
    for b in range(1, count + 1):
        lines.append(f'  <VRTRasterBand dataType="{gtype}" band="{b}" blockXSize="{bx}" blockYSize="{by}">')
        if names[b - 1]:
            lines.append(f"    <Description>{escape(names[b - 1])}</Description>")
        for r0, c0 in copies:
            h, w = min(th, size - r0), min(tw, size - c0)
            lines += [
                "    <SimpleSource>",
                f'      <SourceFilename relativeToVRT="0">{escape(str(tile))}</SourceFilename>',
                f"      <SourceBand>{b}</SourceBand>",
                f'      <SourceProperties RasterXSize="{tw}" RasterYSize="{th}" DataType="{gtype}" '
                f'BlockXSize="{bx}" BlockYSize="{by}"/>',
                f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>',
                f'      <DstRect xOff="{c0}" yOff="{r0}" xSize="{w}" ySize="{h}"/>',
                "    </SimpleSource>",
            ]  # fmt: skip
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def graph_stats(obj: Any, n_chunks: int, build_s: float, pickle_graph: bool = True) -> dict[str, Any]:
    """Size of a Dask collection's graph, without computing it.

    Returns {"tasks": tasks of the materialised graph, "tasks_per_chunk", "layers": layers of
    its HighLevelGraph, "build_s": ``build_s``, "materialise_s": seconds for ``dict(graph)``,
    "tasks_optimized": tasks after the collection's own ``__dask_optimize__`` (blockwise and
    low-level fusion, culling), "optimize_s", and unless not ``pickle_graph``, "pickle_mb" and
    "pickle_s" of the cloudpickled task dict}.
    """
    import cloudpickle

    graph = obj.__dask_graph__()
    t0 = time.perf_counter()
    tasks = dict(graph)
    t1 = time.perf_counter()
    optimized = obj.__dask_optimize__(graph, obj.__dask_keys__())
    n_opt = len(dict(optimized))
    t2 = time.perf_counter()
    out = {"tasks": len(tasks), "tasks_per_chunk": round(len(tasks) / n_chunks, 3),
           "layers": len(getattr(graph, "layers", {})) or None, "build_s": round(build_s, 3),
           "materialise_s": round(t1 - t0, 3), "tasks_optimized": n_opt, "optimize_s": round(t2 - t1, 3)}  # fmt: skip
    if pickle_graph:
        t3 = time.perf_counter()
        blob = cloudpickle.dumps(tasks, protocol=5)
        out.update(pickle_mb=round(len(blob) / 2**20, 3), pickle_s=round(time.perf_counter() - t3, 3))
    return out


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def ingest_graph(vrt: Path, chunk: int, scratch: Path) -> Any:
    """The ingest stage's collection for ``vrt`` (see ``stages.ingest``), up to the compute:
    ``write_image``'s Delayed. Writes the store's metadata (no chunks) under ``scratch``."""
    from pipeline import apply
    from pipeline.io import raster as rio_io
    from pipeline.io import store as zstore

    bands = rio_io.describe_sources([vrt])
    grid = rio_io.target_grid(bands, None, None, False)
    image = apply.read_image(bands, grid, chunk, "bilinear", None, where=f"ingest -> {scratch}")
    ds = zstore.image_dataset(image, grid, [b.name for b in bands], None)
    return zstore.write_image(ds, scratch / f"ingest_{chunk}.zarr", chunk)


def _store_image(shape: tuple[int, int, int], chunk: int, dtype: str, store: str) -> Any:
    """``apply.read_store_image`` of a store that is never read, chunked like an ingested one."""
    from pipeline import apply
    from pipeline.grid import chunk_sizes

    chunks = ((shape[0],), chunk_sizes(shape[1], chunk), chunk_sizes(shape[2], chunk))
    return apply.read_store_image(store, shape, chunks, dtype, f"segment of {store}")


def segment_graphs(size: int, chunk: int, store: str) -> dict[str, tuple[Any, float]]:
    """The threshold (Otsu on B08) collections of ``stages.segment`` on a (4, size, size) uint8
    store: histogram, labels, and the chunk writes; each with its build time in seconds."""
    from pipeline import apply
    from pipeline.config import LABEL_NODATA
    from pipeline.io import store as zstore
    from pipeline.segment.classical import Expression, integer_bin_edges

    names = list(harness.SCENE_BANDS)

    def base() -> tuple[Any, Any]:
        image = _store_image((len(names), size, size), chunk, "uint8", store)
        return image, apply.IndexKernel(Expression.parse("B08", names), names, None)

    (image, index), t = _timed(base)
    hist, th = _timed(apply.index_histogram, image, index, integer_bin_edges("uint8"), "segment")
    labels, tl = _timed(apply.index_labels, image, index, 126.0, LABEL_NODATA, "segment")
    writes, tw = _timed(apply.write_chunks, labels, None, zstore.ChunkWriter(store, "sha256:graph-benchmark"))
    return {"segment_histogram": (hist, t + th), "segment_labels": (labels, t + tl),
            "segment_write": (writes, t + tl + tw)}


def unet_graphs(size: int, chunk: int, store: str, model: str = MODEL) -> dict[str, tuple[Any, float]]:
    """The U-Net collections of ``stages.segment`` (see ``stages._unet_labels``) on a
    (10, size, size) uint16 store of the model's bands: blended probabilities (one task per
    window block of one batch, one per chunk adding them; :mod:`pipeline.inference`) and the
    argmax labels with the validity channel (nodata 0); each with its build time in seconds.
    """
    from pipeline import apply, inference
    from pipeline.blend import WindowGrid
    from pipeline.config import LABEL_NODATA, UNetConfig
    from pipeline.segment.unet import check_bands, load_spec

    spec = load_spec(model)
    names = list(spec.bands)
    t0 = time.perf_counter()
    image = _store_image((len(names), size, size), chunk, "uint16", store)
    band_idx = check_bands(spec, names)
    wgrid = WindowGrid.from_overlap(256, 0.25, spec.divisor)
    out = inference.unet_probabilities(store, image, band_idx, wgrid, "hann", model, "cpu", 8, 0, len(spec.classes),
                                       strip_px=UNetConfig().strip_px)  # the default strips, as segment builds it
    t1 = time.perf_counter()
    labels = apply.argmax_valid_labels(out, LABEL_NODATA)
    t2 = time.perf_counter()
    return {"unet_probabilities": (out, t1 - t0), "unet_labels": (labels, t2 - t0)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000, help="edge of the mosaic in pixels (size x size)")
    ap.add_argument("--chunks", default="512,1024,2048", help="comma-separated chunk edges T (pixels)")
    ap.add_argument("--tile", type=int, default=2048, help="edge of the scene GeoTIFF the VRT repeats (pixels)")
    ap.add_argument("--stages", default="ingest,segment,unet", help="comma-separated subset of ingest,segment,unet")
    ap.add_argument("--no-pickle", action="store_true", help="skip pickling the graphs")
    ap.add_argument("--input-dir", default=str(harness.INPUT_DIR), help="where the scene tile is kept")
    ap.add_argument("--results", default=str(harness.DEFAULT_RESULTS))
    args = ap.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",") if c]
    stages = [s for s in args.stages.split(",") if s]

    import rasterio

    import pipeline.stages  # noqa: F401  (imports xarray, zarr, ...: not part of any build time)

    tile = harness.write_scene_geotiff(Path(args.input_dir) / f"scene_{args.tile}.tif", args.tile)
    scratch = Path(tempfile.mkdtemp(prefix="tileseg-bench-graph-"))
    try:
        vrt, t_vrt = _timed(write_mosaic_vrt, scratch / f"mosaic_{args.size}.vrt", tile, args.size)
        t0 = time.perf_counter()
        with rasterio.open(vrt) as ds:
            opened = {"height": ds.height, "width": ds.width, "count": ds.count, "dtypes": sorted(set(ds.dtypes)),
                      "descriptions": list(ds.descriptions)}  # fmt: skip
        t_open = time.perf_counter() - t0
        if (opened["height"], opened["width"]) != (args.size, args.size):
            raise SystemExit(f"rasterio reads the VRT as {opened['height']} x {opened['width']}, not {args.size}")
        row: dict[str, Any] = {
            "case": "graph", "shape": [args.size, args.size],
            "vrt": {**opened, "tile": tile.name, "tile_edge": args.tile, "bytes": vrt.stat().st_size,
                    "sources_per_band": math.ceil(args.size / args.tile) ** 2, "write_s": round(t_vrt, 3),
                    "open_s": round(t_open, 3)},
            "chunks": {},
        }  # fmt: skip
        store = str(scratch / "never-written.zarr")
        for chunk in chunks:
            n = math.ceil(args.size / chunk) ** 2
            graphs: dict[str, tuple[Any, float]] = {}
            if "ingest" in stages:
                graphs["ingest"] = _timed(ingest_graph, vrt, chunk, scratch)
            if "segment" in stages:
                graphs.update(segment_graphs(args.size, chunk, store))
            if "unet" in stages:
                graphs.update(unet_graphs(args.size, chunk, store))
            row["chunks"][str(chunk)] = {
                "n_chunks": n,
                "graphs": {k: graph_stats(obj, n, t, not args.no_pickle) for k, (obj, t) in graphs.items()},
            }
            del graphs
        harness.emit(row, args.results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
