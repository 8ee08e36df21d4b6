"""Benchmark case 3: U-Net inference with overlap blending, tileseg disk to disk vs MONAI in memory.

Same model (the committed ``models/eobox-unet.safetensors`` by default), window, overlap,
batch size and Gaussian weighting (sigma 0.125 W) on both sides, and the same window
placement (tileseg's ``placement: edge`` is MONAI's). Each side runs in its own child
process (:mod:`tests.benchmarks.harness`: process-tree peak RSS).

Sides:

- ``tileseg``: the segment stage (``method: unet``) from the zarr store to ``labels`` in the
  store, then stitch to a COG: zarr in, zarr + COG out, on Dask's threaded scheduler
  (``dask.scheduler: threads``, one thread per core: the default ``auto`` without GPUs), timed from the first read to the
  published COG.
- ``tileseg_distributed``: the same on a LocalCluster (``dask.scheduler: distributed``,
  2 worker processes x 1 thread), started before the clock.
- ``monai``: the store's model bands read into memory and normalised (not timed), then
  ``monai.inferers.sliding_window_inference(mode="gaussian", sigma_scale=0.125)`` and the
  argmax (timed).
- ``monai_channels_last``: the same with the model and each window in channels_last layout
  (what tileseg does; MONAI's fastest plain-PyTorch way on a CPU).
- ``monai_compiled`` (with ``--compile``): channels_last and ``torch.compile``, compiled by a
  warm-up call before the clock. ``--compile`` also runs the tileseg sides with
  ``segment.unet.compile: true``, compiled before the clock (``pipeline.segment.unet.warm_model``).

The model is loaded before the clock on every side (tileseg: into the process's model
cache, or on every worker for ``tileseg_distributed``), and each side's first model call,
with its one-off kernel selection, is inside the clock.

Input: the sample scene (config/default.yaml inputs, 13 bands on the 10 m grid) ingested
once and tiled ``--repeat-y`` x ``--repeat-x`` times (768 x 1536 px each) into a store kept
under ``outputs/benchmarks/inputs`` (never committed); each tileseg side works on a copy.

Agreement: labels of each tileseg side vs MONAI's on every valid pixel (not all bands 0).

Usage: python tests/benchmarks/bench_unet.py [--repeat-y 3 --repeat-x 2] [--device cpu|cuda]
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

import numpy as np  # noqa: E402

from tests.benchmarks import harness  # noqa: E402

SIDES = ("tileseg", "tileseg_distributed", "monai", "monai_channels_last", "monai_compiled")


def scene_store(config: str, repeat_y: int, repeat_x: int, out: Path) -> Path:
    """The sample scene ingested (``config``'s inputs and ingest options, 512 px chunks) and
    tiled ``repeat_y`` x ``repeat_x`` times into a zarr store at ``out`` (made once, then reused)."""
    if (out / "zarr.json").is_file():
        return out
    import dask.array as da

    from pipeline import stages
    from pipeline.config import load_config
    from pipeline.grid import Grid
    from pipeline.io import store as zstore

    cfg = load_config(config)
    tmp = Path(tempfile.mkdtemp(prefix="tileseg-bench-scene-"))
    try:
        small = stages.ingest(cfg.inputs, tmp / "scene.zarr", cfg.ingest.model_copy(update={"chunk_size": 512}),
                              progress=False)  # fmt: skip
        ds = zstore.open_store(small)
        img = np.tile(ds[zstore.IMAGE].values, (1, repeat_y, repeat_x))
        g = zstore.store_grid(ds)
        grid = Grid(g.crs_wkt, g.transform, img.shape[1], img.shape[2])
        big = zstore.image_dataset(da.from_array(img, chunks=(img.shape[0], 512, 512)), grid,
                                   list(ds[zstore.IMAGE].attrs["band_names"]), ds[zstore.IMAGE].attrs.get("nodata"))  # fmt: skip
        part = out.with_name(out.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        zstore.write_image(big, part, 512).compute()
        part.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def side_tileseg(store: Path, work: Path, args: argparse.Namespace, processes: bool) -> None:
    """Child: segment (unet) + stitch on a copy of the store."""
    from pipeline import stages
    from pipeline.cluster import dask_client
    from pipeline.config import DaskConfig, SegmentConfig, StitchConfig, UNetConfig
    from pipeline.io import store as zstore

    local = work / "scene.zarr"
    shutil.copytree(store, local)
    window, overlap = args.tileseg_window or args.window, args.overlap if args.tileseg_overlap is None else args.tileseg_overlap
    seg = SegmentConfig(method="unet", unet=UNetConfig(model=args.model, window=window, overlap=overlap,
                        blend="gaussian", placement="edge", batch_size=args.batch, device=args.device,
                        compile=args.compile))  # fmt: skip
    from pipeline.segment.unet import cached_model, warm_model

    cfg = DaskConfig(progress=False, scheduler="distributed" if processes else "threads")
    compile_s = None
    with dask_client(cfg) as client:
        if args.compile:  # compile before the clock, as the monai_compiled side does (each worker compiles its own)
            if client is not None:
                client.run(warm_model, args.model, args.device, True, args.batch, window)
            compile_s = round(warm_model(args.model, args.device, True, args.batch, window), 1)
        if client is not None:  # load the model on every worker before the clock, as below in this process
            client.run(cached_model, args.model, args.device, args.compile)
        cached_model(args.model, args.device, args.compile)
        with harness.py_spy(args.profile):
            t1 = time.perf_counter()
            stages.segment(local, seg, progress=False, overwrite=True)
            t2 = time.perf_counter()
            stages.stitch(local, work / "labels.tif", StitchConfig(), progress=False, overwrite=True)
            t3 = time.perf_counter()
    labels = zstore.open_store(local)[zstore.LABELS].values
    np.save(work / "labels.npy", labels)
    harness.report_side(wall_s=t3 - t1, segment_s=round(t2 - t1, 3), stitch_s=round(t3 - t2, 3),
                        compile=args.compile, compile_s=compile_s, labels=str(work / "labels.npy"))  # fmt: skip


def side_monai(store: Path, work: Path, args: argparse.Namespace, layout: bool, compiled: bool) -> None:
    """Child: the model bands in memory, normalised (not timed); sliding window + argmax (timed)."""
    import torch
    from monai.inferers import sliding_window_inference

    from pipeline.io import store as zstore
    from pipeline.segment.unet import load_model, normalise

    net, spec = load_model(args.model, args.device)
    ds = zstore.open_store(store)
    names = list(ds[zstore.IMAGE].attrs["band_names"])
    x = ds[zstore.IMAGE].values[[names.index(b) for b in spec.bands]]
    valid = ~(x == 0).all(axis=0)
    inp = torch.from_numpy(normalise(x[None], spec, valid[None])).to(args.device)
    cuda = args.device == "cuda"
    if layout:
        net = net.to(memory_format=torch.channels_last)
    if compiled:
        net = torch.compile(net)

    def predictor(t: torch.Tensor) -> torch.Tensor:
        if layout:
            t = t.contiguous(memory_format=torch.channels_last)
        if cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return torch.softmax(net(t).float(), dim=1)
        return torch.softmax(net(t), dim=1)

    def run(image: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            probs = sliding_window_inference(image, (args.window, args.window), args.batch, predictor,
                                             overlap=args.overlap, mode="gaussian", sigma_scale=0.125)  # fmt: skip
            labels = probs[0].argmax(dim=0)
        if cuda:
            torch.cuda.synchronize()
        return labels.cpu().numpy()

    if compiled:  # compile outside the clock
        run(inp[..., : 2 * args.window, : 2 * args.window])
    with harness.py_spy(args.profile):
        t0 = time.perf_counter()
        labels = run(inp)
        t1 = time.perf_counter()
    np.save(work / "labels.npy", np.where(valid, labels, 255).astype(np.uint8))
    harness.report_side(wall_s=t1 - t0, torch_threads=torch.get_num_threads(), labels=str(work / "labels.npy"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/default.yaml")
    ap.add_argument("--model", default="models/eobox-unet.safetensors")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat-y", type=int, default=3, help="tile the 768 x 1536 px scene this many times down")
    ap.add_argument("--repeat-x", type=int, default=2, help="... and across")
    ap.add_argument("--tileseg-window", type=int, help="the tileseg sides' window (default: --window)")
    ap.add_argument("--tileseg-overlap", type=float, help="the tileseg sides' overlap (default: --overlap)")
    ap.add_argument("--compile", action="store_true",
                    help="tileseg sides with segment.unet.compile (compiled before the clock), and monai_compiled")
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    harness.side_arguments(ap, SIDES)
    args = ap.parse_args(argv)

    if args.side:  # child process
        store, work = Path(args.store), Path(args.work)
        if args.side.startswith("tileseg"):
            side_tileseg(store, work, args, args.side == "tileseg_distributed")
        else:
            side_monai(store, work, args, args.side != "monai", args.side == "monai_compiled")
        return

    sides = [s for s in args.sides.split(",") if s and (s != "monai_compiled" or args.compile)]
    if args.sides == ",".join(SIDES):  # the default: the distributed side only on request
        sides = [s for s in sides if s != "tileseg_distributed"]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    store = Path(args.input) if args.input else scene_store(
        args.config, args.repeat_y, args.repeat_x, harness.INPUT_DIR / f"unet_scene_{args.repeat_y}x{args.repeat_x}.zarr"
    )  # fmt: skip
    from pipeline.io import store as zstore

    h, w = zstore.open_store(store)[zstore.IMAGE].shape[1:]
    mpx = h * w / 1e6
    work = Path(tempfile.mkdtemp(prefix="tileseg-bench-unet-"))
    try:
        results = harness.run_case_sides(__file__, "unet", sides, work, ["--store", str(store), "--model", args.model,
                                         "--device", args.device, "--window", str(args.window), "--overlap",
                                         str(args.overlap), "--batch", str(args.batch),
                                         *(["--compile"] if args.compile else []),
                                         *(["--tileseg-window", str(args.tileseg_window)] if args.tileseg_window else []),
                                         *(["--tileseg-overlap", str(args.tileseg_overlap)]
                                           if args.tileseg_overlap is not None else [])], args.profile)  # fmt: skip
        row = {"case": "unet", "device": args.device, "shape": [h, w], "window": args.window,
               "overlap": args.overlap, "batch": args.batch, "compile": args.compile, "model": Path(args.model).name,
               "tileseg_window": args.tileseg_window or args.window,
               "tileseg_overlap": args.overlap if args.tileseg_overlap is None else args.tileseg_overlap,
               "sides": {s: r.summary(mpx) for s, r in results.items()}}  # fmt: skip
        monai = [s for s in results if s.startswith("monai")]
        if monai:
            row["monai_best"] = best = min(monai, key=lambda s: results[s].report["wall_s"])
        for base in monai:
            ref = np.load(results[base].report["labels"])
            valid = ref != 255
            for s in results:
                if s.startswith("tileseg"):
                    ours = np.load(results[s].report["labels"])
                    row[f"speedup_{s}_vs_{base}"] = harness.ratio(results[base].report["wall_s"],
                                                                  results[s].report["wall_s"])  # fmt: skip
                    row[f"label_agreement_{s}_vs_{base}"] = round(float((ours == ref)[valid].mean()), 6)
                    row[f"nodata_equal_{s}_vs_{base}"] = bool(np.array_equal(ours == 255, ~valid))
                    if base == best:
                        row[f"goal_met_{s}"] = bool(row[f"speedup_{s}_vs_{base}"] >= 1.0
                                                    and row[f"label_agreement_{s}_vs_{base}"] >= 0.999)  # fmt: skip
        harness.emit(row, args.results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
