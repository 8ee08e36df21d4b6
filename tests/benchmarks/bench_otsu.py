"""Benchmark case 2: Otsu thresholding of one band, from a GeoTIFF to a label raster.

Sides (each in its own child process, see :mod:`tests.benchmarks.harness`):

- ``tileseg``: ``stages.ingest`` -> ``stages.segment`` (``threshold`` on the band, Otsu
  from the whole-raster histogram, chunk by chunk) -> ``stages.stitch`` (a COG with
  overviews and a colour table), on a LocalCluster (``dask.scheduler: distributed``,
  2 worker processes x 1 thread; started before the clock, ``startup_s``). The modules the
  stages import lazily (:data:`harness.WARM_MODULES`) are imported before the clock, as the
  whole-image side imports rasterio and skimage before its own.
- ``tileseg_threads``: the same with ``dask.scheduler: threads`` (no cluster: Dask's threaded
  scheduler in the process, 2 threads): what the default ``auto`` picks without GPUs.
- ``whole_image``: the whole-image way: ``rasterio`` reads the band whole, then
  ``skimage.filters.threshold_otsu``, ``labels = band > t`` as uint8, written as a tiled
  deflate GeoTIFF (512 px tiles, no overviews). ``--whole-read all`` reads every band
  instead of only the one thresholded.

Agreement (every pixel, compared window by window in this process):

- ``labels_identical``: tileseg's COG equals the whole-image GeoTIFF;
- ``threshold_tileseg`` / ``threshold_whole_image`` and their difference; on uint8 data
  both thresholds split the values the same way when ``split_*`` (the smallest value
  labelled 1) agree;
- ``identical_at_tileseg_threshold``: tileseg's COG equals ``band > threshold_tileseg``
  computed on the whole band, i.e. the chunked pipeline applies its own threshold exactly.

Usage: python tests/benchmarks/bench_otsu.py [--size 8192] [--band B08] [--results FILE]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tests.benchmarks import harness  # noqa: E402

SIDES = ("tileseg", "tileseg_threads", "whole_image")


def side_tileseg(src: Path, work: Path, band: str, chunk: int, processes: bool, profile: str | None) -> None:
    """Child: ingest -> segment (Otsu on ``band``) -> stitch, on a LocalCluster of processes
    or on Dask's threaded scheduler."""
    from pipeline import stages
    from pipeline.cluster import dask_client
    from pipeline.config import DaskConfig, IngestConfig, SegmentConfig, StitchConfig, ThresholdConfig
    from pipeline.io import store as zstore

    cfg = DaskConfig(progress=False, scheduler="distributed" if processes else "threads")
    seg = SegmentConfig(method="threshold", threshold=ThresholdConfig(expression=band, value=None))
    store, cog = work / "scene.zarr", work / "labels.tif"
    t0 = time.perf_counter()
    with dask_client(cfg) as client:
        # before the clock, as the whole-image side imports rasterio and skimage before its own
        harness.warm_up(harness.WARM_MODULES)
        if client is not None:
            client.run(harness.warm_up, harness.WARM_MODULES)
        with harness.py_spy(profile):
            t1 = time.perf_counter()
            stages.ingest([src], store, IngestConfig(chunk_size=chunk), progress=False, overwrite=True)
            t2 = time.perf_counter()
            stages.segment(store, seg, progress=False, overwrite=True)
            t3 = time.perf_counter()
            stages.stitch(store, cog, StitchConfig(), progress=False, overwrite=True)
            t4 = time.perf_counter()
    threshold = float(zstore.open_store(store)[zstore.LABELS].attrs["threshold"])
    harness.report_side(wall_s=t4 - t1, startup_s=round(t1 - t0, 3), ingest_s=round(t2 - t1, 3),
                        segment_s=round(t3 - t2, 3), stitch_s=round(t4 - t3, 3), threshold=threshold,
                        output=str(cog))  # fmt: skip


def side_whole_image(src: Path, work: Path, band: str, read_all: bool, profile: str | None) -> None:
    """Child: read the band whole with rasterio, ``skimage.filters.threshold_otsu``, write a GeoTIFF."""
    import rasterio
    from skimage.filters import threshold_otsu

    def read_band() -> tuple[np.ndarray, dict]:  # named, so that profiles show the GDAL call (py-spy: no C frames)
        with rasterio.open(src) as ds:
            index = list(ds.descriptions).index(band) + 1
            return (ds.read()[index - 1] if read_all else ds.read(index)), ds.profile

    def write_geotiff(labels: np.ndarray, meta: dict) -> None:
        meta.update(count=1, dtype="uint8", nodata=None, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
        with rasterio.open(out, "w", **meta) as dst:
            dst.write(labels, 1)

    out = work / "labels_whole.tif"
    with harness.py_spy(profile):
        t0 = time.perf_counter()
        values, meta = read_band()
        t = threshold_otsu(values)
        labels = (values > t).astype(np.uint8)
        write_geotiff(labels, meta)
        t1 = time.perf_counter()
    harness.report_side(wall_s=t1 - t0, threshold=float(t), output=str(out))


def _split(t: float) -> int:
    """The smallest integer value v with v > t (the first value labelled 1 on integer data)."""
    return math.floor(t) + 1


def compare(tileseg_cog: str, whole_tif: str, src: Path, band: str, t_tileseg: float) -> dict:
    """Pixel counts where tileseg's labels differ from the whole-image labels, and from ``band > t_tileseg``."""
    import rasterio
    from rasterio.windows import Window

    diff_whole = diff_own = 0
    with rasterio.open(tileseg_cog) as a, rasterio.open(whole_tif) as b, rasterio.open(src) as s:
        index = list(s.descriptions).index(band) + 1
        step = 1024
        for r0 in range(0, a.height, step):
            for c0 in range(0, a.width, step):
                w = Window(c0, r0, min(step, a.width - c0), min(step, a.height - r0))
                la, lb, v = a.read(1, window=w), b.read(1, window=w), s.read(index, window=w)
                diff_whole += int(np.count_nonzero(la != lb))
                diff_own += int(np.count_nonzero(la != (v > t_tileseg)))
        n = a.width * a.height
    return {"pixels": n, "differing_pixels": diff_whole, "labels_identical": diff_whole == 0,
            "agreement": round(1 - diff_whole / n, 8), "identical_at_tileseg_threshold": diff_own == 0,
            "differing_at_tileseg_threshold": diff_own}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from pipeline.config import IngestConfig  # the library's default chunk edge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192, help="raster edge in pixels (size x size)")
    ap.add_argument("--band", default="B08", help="band to threshold (B02, B03, B04 or B08)")
    ap.add_argument("--chunk", type=int, default=IngestConfig().chunk_size, help="tileseg chunk edge T (default: ingest.chunk_size's)")
    ap.add_argument("--whole-read", choices=("band", "all"), default="band",
                    help="whole-image side reads only the band (default) or every band")  # fmt: skip
    harness.side_arguments(ap, SIDES)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.side:  # child process
        src, work = Path(args.input), Path(args.work)
        if args.side == "whole_image":
            side_whole_image(src, work, args.band, args.whole_read == "all", args.profile)
        else:
            side_tileseg(src, work, args.band, args.chunk, args.side == "tileseg", args.profile)
        return

    sides, src = harness.prepare_input(args)
    import rasterio

    with rasterio.open(src) as ds:
        h, w = ds.height, ds.width
    mpx = h * w / 1e6
    work = Path(tempfile.mkdtemp(prefix="tileseg-bench-otsu-"))
    try:
        results = harness.run_case_sides(__file__, "otsu", sides, work, ["--input", str(src), "--band", args.band,
                                         "--chunk", str(args.chunk), "--whole-read", args.whole_read],
                                         args.profile)  # fmt: skip
        base = "whole_image"
        row = {"case": "otsu", "shape": [h, w], "band": args.band, "dtype": "uint8", "chunk": args.chunk,
               "whole_read": args.whole_read, "input": {"file": src.name, "bytes": src.stat().st_size},
               "sides": {s: r.summary(mpx) for s, r in results.items()}}  # fmt: skip
        for s in sides:
            if s == base or base not in results:
                continue
            t_ts, t_wh = float(results[s].report["threshold"]), float(results[base].report["threshold"])
            row[f"speedup_{s}_vs_{base}"] = harness.ratio(results[base].report["wall_s"], results[s].report["wall_s"])
            row[f"memory_{s}_over_{base}"] = round(results[s].peak_rss / results[base].peak_rss, 3)
            row[f"agreement_{s}_vs_{base}"] = {
                "threshold_tileseg": t_ts, "threshold_whole_image": t_wh, "threshold_difference": t_ts - t_wh,
                "split_tileseg": _split(t_ts), "split_whole_image": _split(t_wh),
                **compare(results[s].report["output"], results[base].report["output"], src, args.band, t_ts),
            }  # fmt: skip
        harness.emit(row, args.results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
