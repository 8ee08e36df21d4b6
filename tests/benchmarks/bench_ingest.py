"""Benchmark case 1: ingest of a large 4-band uint8 tiled deflate GeoTIFF into a zarr store.

Sides (each in its own child process, see :mod:`tests.benchmarks.harness`):

- ``tileseg``: ``stages.ingest`` with ``dask.scheduler: distributed``: a LocalCluster
  (:class:`~pipeline.config.DaskConfig`: 2 worker processes x 1 thread); the cluster is
  started before the clock starts (a run starts it once for all its stages; its start-up
  time is reported as ``startup_s``), and its workers count in the peak RSS.
- ``tileseg_threads``: the same stage with ``dask.scheduler: threads`` (no cluster: Dask's
  threaded scheduler in the process, 2 threads): what the default ``auto`` picks on a
  machine without GPUs.
- ``rioxarray``: ``rioxarray.open_rasterio(path, chunks=...)`` followed by ``.to_zarr()``
  with the same chunking (band, T, T) and the same (default) zarr v3 codecs, on Dask's
  default threaded scheduler, as a user would write it.

Agreement: the ``image`` array of both stores, compared chunk by chunk (every value).
The input is made from the real sample scene (``harness.write_scene_geotiff``) and kept
under ``outputs/benchmarks/inputs`` for reuse.

Usage: python tests/benchmarks/bench_ingest.py [--size 8192] [--chunk 512] [--results FILE]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks import harness  # noqa: E402

SIDES = ("tileseg", "tileseg_threads", "rioxarray")


def side_tileseg(src: Path, out: Path, chunk: int, processes: bool, profile: str | None) -> None:
    """Child: ingest with tileseg on a LocalCluster of processes (``dask.scheduler: distributed``) or Dask's threaded scheduler."""
    from pipeline import stages
    from pipeline.cluster import dask_client
    from pipeline.config import DaskConfig, IngestConfig

    cfg = DaskConfig(progress=False, scheduler="distributed" if processes else "threads")
    t0 = time.perf_counter()
    with dask_client(cfg), harness.py_spy(profile):
        t1 = time.perf_counter()
        stages.ingest([src], out, IngestConfig(chunk_size=chunk), progress=False, overwrite=True)
        t2 = time.perf_counter()
    harness.report_side(wall_s=t2 - t1, startup_s=round(t1 - t0, 3), array=str(out / "image"))


def side_rioxarray(src: Path, out: Path, chunk: int, profile: str | None) -> None:
    """Child: ``rioxarray.open_rasterio(chunks=...).to_zarr()`` on Dask's default (threaded) scheduler."""
    import rioxarray

    with harness.py_spy(profile):
        t0 = time.perf_counter()
        arr = rioxarray.open_rasterio(src, chunks={"band": -1, "y": chunk, "x": chunk})
        arr.to_dataset(name="image").to_zarr(out, mode="w", zarr_format=3, consolidated=True)
        t1 = time.perf_counter()
    harness.report_side(wall_s=t1 - t0, array=str(out / "image"))


def main(argv: list[str] | None = None) -> None:
    from pipeline.config import IngestConfig  # the library's default chunk edge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192, help="raster edge in pixels (size x size)")
    ap.add_argument("--chunk", type=int, default=IngestConfig().chunk_size, help="zarr chunk edge T (both sides) (default: ingest.chunk_size's)")
    harness.side_arguments(ap, SIDES)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.side:  # child process
        src, out = Path(args.input), Path(args.out)
        if args.side == "rioxarray":
            side_rioxarray(src, out, args.chunk, args.profile)
        else:
            side_tileseg(src, out, args.chunk, args.side == "tileseg", args.profile)
        return

    sides, src = harness.prepare_input(args)
    import rasterio

    with rasterio.open(src) as ds:
        h, w, nb = ds.height, ds.width, ds.count
    mpx = h * w / 1e6
    work = Path(tempfile.mkdtemp(prefix="tileseg-bench-ingest-"))
    try:
        results = {}
        for side in sides:
            out = work / f"{side}.zarr"
            results[side] = harness.run_case_side(__file__, "ingest", side, ["--input", str(src), "--out", str(out),
                                                  "--chunk", str(args.chunk)], args.profile)  # fmt: skip
        base = "rioxarray"
        row = {"case": "ingest", "shape": [nb, h, w], "dtype": "uint8", "chunk": args.chunk,
               "input": {"file": src.name, "bytes": src.stat().st_size, "compress": "deflate", "tiled": 512},
               "sides": {s: r.summary(mpx) for s, r in results.items()}}  # fmt: skip
        for s in sides:
            if s != base and base in results:
                t_base, t_side = results[base].report["wall_s"], results[s].report["wall_s"]
                row[f"speedup_{s}_vs_{base}"] = harness.ratio(t_base, t_side)
                row[f"agreement_{s}_vs_{base}"] = harness.zarr_arrays_equal(results[s].report["array"],
                                                                            results[base].report["array"])  # fmt: skip
        harness.emit(row, args.results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
