"""Safe to interrupt and repeat: chunk-level resume of segment (also after SIGKILL and a
killed Dask worker), ingest reuse, atomic publishing, and refusing another run's outputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio
import xarray as xr

from pipeline import stages
from pipeline.config import ClassInfo, GroundTruthConfig, IngestConfig, SegmentConfig, StitchConfig, ThresholdConfig
from pipeline.errors import OutputExistsError, RasterIOError
from pipeline.io import store as zstore
from tests import synth

BANDS = ["B02", "B03", "B04", "B08"]
#: a fixed threshold: no global pass, so every second of the run is chunk writes
FIXED = SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="B03", value=2000))
OTSU = SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="(B03 - B08) / (B03 + B08)"))
CLASSES = [ClassInfo(name="below"), ClassInfo(name="above")]
T = 16  # 320 x 320 px in 16 px chunks: 400 chunks


@pytest.fixture(scope="module")
def raster(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume")
    classes = synth.class_map(320, 320, n_classes=4, seed=7)
    return synth.write_tif(d / "img.tif", synth.bands_from_classes(classes, 4, seed=8), names=BANDS)


@pytest.fixture(scope="module")
def fresh_store(raster, tmp_path_factory) -> Path:
    """A store with only the image, to be copied by each test."""
    return stages.ingest([raster], tmp_path_factory.mktemp("fresh") / "s.zarr", IngestConfig(chunk_size=T),
                         progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def reference(fresh_store, tmp_path_factory) -> Path:
    """An uninterrupted segment run (FIXED) on a copy of the store."""
    ref = tmp_path_factory.mktemp("ref") / "s.zarr"
    shutil.copytree(fresh_store, ref)
    stages.segment(ref, FIXED, progress=False)
    return ref


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _chunk_files(store: Path, array: str = "labels") -> dict[str, bytes]:
    root = store / array
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "zarr.json"}  # fmt: skip


def _markers(store: Path) -> set[str]:
    folder = store / "labels_partial" / zstore.DONE_DIR
    return {p.name for p in folder.iterdir() if p.name.count(".") == 1} if folder.is_dir() else set()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args, "--set", "dask.processes=false", "--set", "dask.n_workers=1",
            "--set", "dask.threads_per_worker=2", "--set", "dask.progress=false"]  # fmt: skip


def _segment_cli(store: Path) -> list[str]:
    return _cli("segment", str(store), "--set", "segment.method=threshold", "--set", "segment.threshold.expression=B03",
                "--set", "segment.threshold.value=2000")  # fmt: skip


def _fail_writes_after(n: int, monkeypatch) -> tuple:
    """Chunk writes fail with a full disk after the first ``n``, on Dask's synchronous
    scheduler (the writer runs in this process, one chunk after the other). Returns the
    real writer (to restore) and the list of the chunk indices written or tried."""
    real = zstore.ChunkWriter.__call__
    calls: list = []

    def failing(self, index, *args):
        calls.append(index)
        if len(calls) > n:
            raise OSError("disk full")
        return real(self, index, *args)

    monkeypatch.setattr(zstore.ChunkWriter, "__call__", failing)
    monkeypatch.setitem(dask.config.config, "scheduler", "sync")
    return real, calls


# --------------------------------------------------------------------------- segment: resume
def test_sigkill_during_segment_then_rerun_computes_only_the_missing_chunks(fresh_store, reference, tmp_path):
    store = _copy(fresh_store, tmp_path / "s.zarr")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(_segment_cli(store), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(_markers(store)) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no cleanup code runs: like a crashed machine
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = _markers(store)
    assert 10 <= len(done) < 400, f"{len(done)} markers: the run was not interrupted half-way"
    assert "labels" not in xr.open_zarr(store)  # nothing complete-looking was published
    # the chunk files of the finished chunks, as the killed run left them
    written = {m: store / "labels_partial" / "c" / m.split(".")[0] / m.split(".")[1] for m in done}
    stamps = {m: p.stat().st_mtime_ns for m, p in written.items() if p.exists()}

    rerun = subprocess.run(_segment_cli(store), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} of 400 chunks were already written; computing the other {400 - len(done)}" in rerun.stderr
    # the finished chunks were not written again ...
    for m, stamp in stamps.items():
        assert (store / "labels" / "c" / m.split(".")[0] / m.split(".")[1]).stat().st_mtime_ns == stamp
    # ... and the result is byte for byte the uninterrupted run's
    got, want = _chunk_files(store), _chunk_files(reference)
    assert got.keys() == want.keys() and got == want
    assert xr.open_zarr(store)["labels"].attrs == xr.open_zarr(reference)["labels"].attrs
    assert not (store / "labels_partial").exists() and not (store / "labels" / zstore.DONE_DIR).exists()


def test_sigterm_during_segment_unwinds_like_ctrl_c(fresh_store, reference, tmp_path):
    """SIGTERM killed the process at once (no error line; `tileseg run` left Prefect's
    temporary server running); now it unwinds as Ctrl-C does, with its own exit status."""
    store = _copy(fresh_store, tmp_path / "s.zarr")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(_segment_cli(store), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(_markers(store)) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "error: interrupted (SIGTERM)" and "Traceback" not in err
    assert "labels" not in xr.open_zarr(store)  # nothing complete-looking was published
    rerun = subprocess.run(_segment_cli(store), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "chunks were already written" in rerun.stderr, rerun.stderr
    assert _chunk_files(store) == _chunk_files(reference)


def test_a_killed_dask_worker_is_replaced_and_the_labels_are_unchanged(fresh_store, reference, tmp_path):
    from distributed import Client, LocalCluster

    store = _copy(fresh_store, tmp_path / "s.zarr")
    killed: dict = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:  # fmt: skip

        def kill_one_worker() -> None:
            while len(_markers(store)) < 10 and not killed.get("stop"):
                time.sleep(0.005)
            pid = next(iter(client.run(os.getpid).values()))
            killed["markers"] = len(_markers(store))
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid

        t = threading.Thread(target=kill_one_worker)
        t.start()
        try:
            stages.segment(store, FIXED, progress=False)
        finally:
            killed["stop"] = True
            t.join()
        assert killed.get("pid") and killed["markers"] < 400, killed  # a worker died half-way through the stage
        assert killed["pid"] not in client.run(os.getpid).values()
    got, want = _chunk_files(store), _chunk_files(reference)
    assert got.keys() == want.keys() and got == want


def test_rerun_resumes_after_a_failure_and_skips_up_to_date_labels(fresh_store, reference, tmp_path, monkeypatch,
                                                                    caplog):  # fmt: skip
    store = _copy(fresh_store, tmp_path / "s.zarr")
    real, calls = _fail_writes_after(150, monkeypatch)
    with pytest.raises(RasterIOError, match=r"segment \(threshold\) of .*, chunk \(\d+, \d+\) rows .*disk full"):
        stages.segment(store, FIXED, progress=False)
    done = _markers(store)
    assert len(done) == 150
    calls.clear()
    monkeypatch.setattr(zstore.ChunkWriter, "__call__", lambda self, *a: calls.append(a[0]) or real(self, *a))
    with caplog.at_level(logging.INFO, logger="tileseg"):
        stages.segment(store, FIXED, progress=False)
    assert sorted(calls) == sorted({(i, j) for i in range(20) for j in range(20)} - {
        tuple(int(v) for v in m.split(".")) for m in done})  # fmt: skip
    assert _chunk_files(store) == _chunk_files(reference)
    # the same command once more: the labels are up to date, nothing is written
    calls.clear()
    stamp = (store / "labels" / "zarr.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="tileseg"):
        stages.segment(store, FIXED, progress=False)
    assert calls == [] and "up to date" in caplog.text
    assert (store / "labels" / "zarr.json").stat().st_mtime_ns == stamp
    # --overwrite recomputes every chunk
    stages.segment(store, FIXED, progress=False, overwrite=True)
    assert len(calls) == 400 and _chunk_files(store) == _chunk_files(reference)


def test_another_config_discards_the_unfinished_chunks(fresh_store, tmp_path, monkeypatch):
    store = _copy(fresh_store, tmp_path / "s.zarr")
    real, calls = _fail_writes_after(100, monkeypatch)
    with pytest.raises(RasterIOError):
        stages.segment(store, FIXED, progress=False)
    assert len(_markers(store)) == 100
    monkeypatch.setattr(zstore.ChunkWriter, "__call__", real)
    stages.segment(store, OTSU, progress=False)  # another key: starts afresh
    other = _copy(fresh_store, tmp_path / "o.zarr")
    stages.segment(other, OTSU, progress=False)
    assert _chunk_files(store) == _chunk_files(other)
    assert xr.open_zarr(store)["labels"].attrs["otsu"] is True


def test_a_kmeans_rerun_reuses_the_fit_of_the_same_sample(fresh_store, tmp_path, monkeypatch, caplog):
    """The fit (about 10 s at the default config's size) ran again on every rerun, even of
    up-to-date labels; now a rerun drawing the same sample takes the recorded model, also
    from an interrupted run's labels_partial."""
    from pipeline.config import KMeansConfig

    kmeans = SegmentConfig(method="kmeans", kmeans=KMeansConfig(n_clusters=4, sample_size=3000, seed=1))
    store = _copy(fresh_store, tmp_path / "s.zarr")
    fits: list = []
    real_fit = stages.fit_kmeans
    monkeypatch.setattr(stages, "fit_kmeans", lambda *a: fits.append(a[1:]) or real_fit(*a))
    stages.segment(store, kmeans, progress=False)
    first = _chunk_files(store)
    attrs = xr.open_zarr(store)["labels"].attrs
    assert fits == [(4, 1)] and attrs["kmeans_fit"].startswith("sha256:")
    with caplog.at_level(logging.INFO, logger="tileseg"):
        stages.segment(store, kmeans, progress=False)
    assert fits == [(4, 1)] and "fit is reused" in caplog.text and "up to date" in caplog.text
    # an interrupted run: the fit recorded in labels_partial serves its resumption
    other = kmeans.model_copy(update={"kmeans": KMeansConfig(n_clusters=4, sample_size=3000, seed=2)})
    real, calls = _fail_writes_after(50, monkeypatch)
    with pytest.raises(RasterIOError):
        stages.segment(store, other, progress=False)
    assert fits == [(4, 1), (4, 2)]
    monkeypatch.setattr(zstore.ChunkWriter, "__call__", real)
    stages.segment(store, other, progress=False)
    assert fits == [(4, 1), (4, 2)]
    fresh = _copy(fresh_store, tmp_path / "o.zarr")
    stages.segment(fresh, other, progress=False)
    assert _chunk_files(store) == _chunk_files(fresh) != first
    # --overwrite fits again
    stages.segment(fresh, other, progress=False, overwrite=True)
    assert fits[-1] == (4, 2) and len(fits) == 4


# --------------------------------------------------------------------------- ingest: reuse
def test_ingest_reuses_an_up_to_date_store_and_reingests_a_changed_one(raster, tmp_path, caplog):
    src = shutil.copy(raster, tmp_path / "img.tif")
    store = stages.ingest([src], tmp_path / "s.zarr", IngestConfig(chunk_size=64), progress=False)
    manifest = zstore.read_root_attrs(store)["tileseg_ingest"]
    assert manifest["inputs"] == [{"path": str(Path(src).absolute()), "size": os.path.getsize(src),
                                   "mtime_ns": os.stat(src).st_mtime_ns}]  # fmt: skip
    chunk = store / "image" / "c" / "0" / "0" / "0"
    stamp = chunk.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="tileseg"):
        stages.ingest([src], store, IngestConfig(chunk_size=64), progress=False)
    assert "up to date" in caplog.text and chunk.stat().st_mtime_ns == stamp  # nothing was read or written
    # labels added by segment keep the manifest, so the store stays up to date
    stages.segment(store, FIXED, progress=False)
    assert zstore.read_root_attrs(store)["tileseg_ingest"] == manifest
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tileseg"):
        stages.ingest([src], store, IngestConfig(chunk_size=64), progress=False)
    assert "up to date" in caplog.text and "labels" in xr.open_zarr(store)
    # the input changes (new content, new mtime): re-ingested
    with rasterio.open(src, "r+") as ds:
        ds.write(np.full((320, 320), 7, np.uint16), 1)
    stages.ingest([src], store, IngestConfig(chunk_size=64), progress=False)
    assert (xr.open_zarr(store)["image"][0].values == 7).all()
    assert zstore.read_root_attrs(store)["tileseg_ingest"]["inputs"][0]["mtime_ns"] == os.stat(src).st_mtime_ns
    # the ingest config changes: re-ingested
    stages.ingest([src], store, IngestConfig(chunk_size=32), progress=False)
    assert xr.open_zarr(store)["image"].chunks[1][0] == 32


def test_ingest_refuses_a_store_of_other_inputs_unless_overwrite(raster, tmp_path):
    other = shutil.copy(raster, tmp_path / "other.tif")
    store = stages.ingest([raster], tmp_path / "s.zarr", IngestConfig(chunk_size=64), progress=False)
    with pytest.raises(OutputExistsError, match=r"s\.zarr belongs to another run: it was ingested from other "
                                                r"inputs .*img\.tif.*--overwrite"):  # fmt: skip
        stages.ingest([other], store, IngestConfig(chunk_size=64), progress=False)
    assert zstore.read_root_attrs(store)["tileseg_ingest"]["inputs"][0]["path"] == str(Path(raster).absolute())
    stages.ingest([other], store, IngestConfig(chunk_size=64), progress=False, overwrite=True)
    assert zstore.read_root_attrs(store)["tileseg_ingest"]["inputs"][0]["path"] == str(Path(other).absolute())


# --------------------------------------------------------------------------- atomic publishing
def test_failed_ingest_leaves_the_earlier_store_whole(raster, tmp_path, monkeypatch):
    from pipeline import apply

    store = stages.ingest([raster], tmp_path / "s.zarr", IngestConfig(chunk_size=64), progress=False)
    before = _chunk_files(store, "image")
    real = apply._read_block

    def failing(*args, block_info=None):
        if block_info[None]["chunk-location"][1:] == (2, 3):
            raise OSError("connection reset")
        return real(*args, block_info=block_info)

    monkeypatch.setattr(apply, "_read_block", failing)
    with pytest.raises(RasterIOError, match=r"ingest -> .*s\.zarr, chunk \(2, 3\) rows 128:192 cols 192:256: "
                                            r"OSError: connection reset"):  # fmt: skip
        stages.ingest([raster], store, IngestConfig(chunk_size=64), progress=False, overwrite=True)
    assert _chunk_files(store, "image") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no temporary store left


def _stitched(tmp_path: Path, fresh_store: Path) -> Path:
    store = _copy(fresh_store, tmp_path / "s.zarr")
    stages.segment(store, FIXED, progress=False)
    return store


def test_failed_stitch_leaves_the_earlier_cog_whole(fresh_store, tmp_path, monkeypatch):
    store = _stitched(tmp_path, fresh_store)
    cog = stages.stitch(store, tmp_path / "out" / "labels.tif", StitchConfig(blocksize=64), CLASSES, progress=False)
    before = cog.read_bytes()
    import rasterio.shutil

    def failing_copy(*args, **kwargs):
        raise rasterio.errors.RasterioIOError("no space left on device")

    monkeypatch.setattr(rasterio.shutil, "copy", failing_copy)
    with pytest.raises(RasterIOError, match="no space left"):
        stages.stitch(store, cog, StitchConfig(blocksize=64), CLASSES, progress=False, overwrite=True)
    assert cog.read_bytes() == before
    assert sorted(p.name for p in cog.parent.iterdir()) == ["labels.tif"]


def test_failed_evaluation_leaves_the_earlier_reports_and_error_map_whole(fresh_store, tmp_path, monkeypatch):
    from pipeline import report_html

    store = _stitched(tmp_path, fresh_store)
    cog = stages.stitch(store, tmp_path / "out" / "labels.tif", StitchConfig(blocksize=64), CLASSES, progress=False)
    gt = synth.write_tif(tmp_path / "gt.tif", (synth.class_map(320, 320, 2, seed=9)), nodata=255)
    res = stages.evaluate(cog, GroundTruthConfig(path=gt), CLASSES, None, tmp_path / "out", 64, progress=False)
    names = ("error_map.tif", "report.html", "report.md", "report.json")
    before = {n: (tmp_path / "out" / n).read_bytes() for n in names}

    def failing(*args, **kwargs):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(report_html, "render", failing)  # after the error map was computed and written
    with pytest.raises(RuntimeError, match="renderer crashed"):
        stages.evaluate(cog, GroundTruthConfig(path=gt), CLASSES, None, tmp_path / "out", 64, progress=False)
    assert {n: (tmp_path / "out" / n).read_bytes() for n in names} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted((*names, "labels.tif"))
    assert res.error_map == tmp_path / "out" / "error_map.tif"


# --------------------------------------------------------------------------- another run's outputs
def test_stitch_skips_an_up_to_date_cog_and_refuses_another_runs(fresh_store, tmp_path, caplog):
    store = _stitched(tmp_path, fresh_store)
    out = tmp_path / "labels.tif"
    stages.stitch(store, out, StitchConfig(blocksize=64), CLASSES, progress=False, run_key="sha256:run-a")
    stamp = out.stat().st_mtime_ns
    with rasterio.open(out) as ds:
        assert ds.tags()["TILESEG_RUN"] == "sha256:run-a"
        assert ds.tags()["TILESEG_LABELS"] == xr.open_zarr(store)["labels"].attrs["segment_key"]
    with caplog.at_level(logging.INFO, logger="tileseg"):
        stages.stitch(store, out, StitchConfig(blocksize=64), CLASSES, progress=False, run_key="sha256:run-a")
    assert "up to date" in caplog.text and out.stat().st_mtime_ns == stamp
    with pytest.raises(OutputExistsError, match=r"labels\.tif was written by run sha256:run-a.*--overwrite"):
        stages.stitch(store, out, StitchConfig(blocksize=64), CLASSES, progress=False, run_key="sha256:run-b")
    # the same run with new labels rewrites it
    stages.segment(store, OTSU, progress=False)
    stages.stitch(store, out, StitchConfig(blocksize=64), CLASSES, progress=False, run_key="sha256:run-a")
    with rasterio.open(out) as ds:
        assert ds.tags()["TILESEG_LABELS"] == xr.open_zarr(store)["labels"].attrs["segment_key"]
    stages.stitch(store, out, StitchConfig(blocksize=64), CLASSES, progress=False, run_key="sha256:run-b",
                  overwrite=True)  # fmt: skip
    with rasterio.open(out) as ds:
        assert ds.tags()["TILESEG_RUN"] == "sha256:run-b"
    foreign = tmp_path / "mine.tif"
    foreign.write_text("not tileseg's")
    with pytest.raises(OutputExistsError, match="not this tileseg run"):
        stages.stitch(store, foreign, StitchConfig(blocksize=64), CLASSES, progress=False)
    assert foreign.read_text() == "not tileseg's"


def test_evaluate_refuses_a_report_of_other_settings(fresh_store, tmp_path):
    from pipeline.config import BBox

    store = _stitched(tmp_path, fresh_store)
    cog = stages.stitch(store, tmp_path / "labels.tif", StitchConfig(blocksize=64), CLASSES, progress=False)
    gt = GroundTruthConfig(path=synth.write_tif(tmp_path / "gt.tif", synth.class_map(320, 320, 2, seed=9)))
    first = stages.evaluate(cog, gt, CLASSES, None, tmp_path / "ev", 64, progress=False)
    stages.evaluate(cog, gt, CLASSES, None, tmp_path / "ev", 64, progress=False)  # the same settings: a rerun
    x0, y1 = synth.ORIGIN
    area = BBox(xmin=x0, ymin=y1 - 1000, xmax=x0 + 1000, ymax=y1)
    with pytest.raises(OutputExistsError, match=r"report\.json is a report of run sha256:.*--overwrite"):
        stages.evaluate(cog, gt, CLASSES, area, tmp_path / "ev", 64, progress=False)
    assert json.loads(first.report_json.read_text())["config_hash"] == first.report["config_hash"]
    again = stages.evaluate(cog, gt, CLASSES, area, tmp_path / "ev", 64, progress=False, overwrite=True)
    assert json.loads(again.report_json.read_text())["config_hash"] != first.report["config_hash"]


def test_a_whole_run_is_refused_before_it_writes_when_outputs_belong_to_another(raster, tmp_path):
    from pipeline.config import load_config
    from pipeline.resume import check_run_outputs

    cfg = load_config(None, [f"inputs=[{raster}]", f"output_dir={tmp_path}", "ingest.chunk_size=64"])
    check_run_outputs(cfg)  # nothing there yet
    stages.ingest(cfg.inputs, cfg.store_path, cfg.ingest, progress=False)
    stages.segment(cfg.store_path, FIXED, progress=False)
    stages.stitch(cfg.store_path, cfg.cog_path, cfg.stitch, progress=False, run_key=cfg.config_hash())
    check_run_outputs(cfg)  # its own outputs: a resume
    # dask settings and --overwrite change no output, so they do not make another run
    check_run_outputs(cfg.model_copy(update={"dask": cfg.dask.model_copy(update={"n_workers": 7})}))
    other = load_config(None, [f"inputs=[{raster}]", f"output_dir={tmp_path}", "ingest.chunk_size=64",
                               "stitch.compress=zstd"])  # fmt: skip
    with pytest.raises(OutputExistsError, match=r"labels\.tif was written by run"):
        check_run_outputs(other)
    copy = shutil.copy(raster, tmp_path / "copy.tif")
    moved = load_config(None, [f"inputs=[{copy}]", f"output_dir={tmp_path}", "ingest.chunk_size=64"])
    with pytest.raises(OutputExistsError, match="scene.zarr belongs to another run"):
        check_run_outputs(moved)
    check_run_outputs(moved.model_copy(update={"overwrite": True}))


def test_an_instance_run_is_refused_when_its_outputs_belong_to_another(tmp_path):
    """Instance runs replaced another run's exports, reports and microscopy store without
    asking; now each output records its run and the whole run is checked first."""
    import dask.array as da
    import tifffile

    from pipeline.config import load_config
    from pipeline.io.ome import write_label_tiff, write_ome_zarr
    from pipeline.resume import OWNER_TAG, RUN_ATTR, check_run_outputs

    img = tmp_path / "cells.tif"
    tifffile.imwrite(img, (np.random.default_rng(0).random((64, 64)) * 1000).astype(np.uint16))
    over = [f"inputs=[{img}]", f"output_dir={tmp_path / 'out'}", "segment.method=none", "instances={}",
            "ingest.chunk_size=32"]  # fmt: skip
    cfg = load_config(None, over)
    key = cfg.config_hash()
    out = tmp_path / "out"
    check_run_outputs(cfg)  # nothing there yet
    stages.ingest_microscopy(img, cfg.store_path, cfg.ingest, progress=False)
    check_run_outputs(cfg)  # its own store: reused
    ids = da.zeros((64, 64), dtype=np.uint32, chunks=32)
    write_label_tiff(ids, out / "instances.tif", tags={OWNER_TAG: key})
    write_ome_zarr(out / "instances.ome.zarr", da.zeros((1, 64, 64), np.uint16, chunks=32), ["c"], labels=ids,
                   chunk=32, progress=False, attrs={RUN_ATTR: key})  # fmt: skip
    (out / "report_instances.json").write_text(json.dumps({"config_hash": key}))
    check_run_outputs(cfg)  # all its own: a rerun
    other = load_config(None, [*over, "instances.min_size=3"])
    with pytest.raises(OutputExistsError, match=r"instances\.ome\.zarr was written by run sha256:.*--overwrite"):
        check_run_outputs(other)
    check_run_outputs(other.model_copy(update={"overwrite": True}))
    # a file that records no run is not this run's either
    (out / "report_instances.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="report_instances.json was written by something that is not"):
        check_run_outputs(cfg)
    # a microscopy store of another image
    shutil.copy(img, tmp_path / "other.tif")
    moved = load_config(None, [*over[1:], f"inputs=[{tmp_path / 'other.tif'}]"])
    with pytest.raises(OutputExistsError, match=r"scene\.zarr belongs to another run: it holds .*cells\.tif"):
        check_run_outputs(moved)


def test_cli_overwrite_flag(raster, tmp_path):
    other = shutil.copy(raster, tmp_path / "other.tif")
    store = tmp_path / "s.zarr"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ok = subprocess.run(_cli("ingest", str(raster), str(store)), env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(_cli("ingest", str(other), str(store)), env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("error: the store") and "--overwrite" in refused.stderr
    forced = subprocess.run(_cli("ingest", str(other), str(store), "--overwrite"), env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    assert zstore.read_root_attrs(store)["tileseg_ingest"]["inputs"][0]["path"] == str(Path(other).absolute())


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(fresh_store, tmp_path):
    """SIGKILL during stitch or evaluate left hidden temporaries that no later run removed."""
    from pipeline.io import files

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    cog = tmp_path / "labels.tif"
    old = time.time() - 2 * files.STALE_AFTER_S
    stale = [tmp_path / f".labels.tif.cog-{dead}.tmp.tif", tmp_path / f".labels.tif.cog-{dead}.tmp.tif.ovr.tmp",
             tmp_path / f".labels.tif.tiled-{dead}.tmp.tif", tmp_path / f".labels.tif.{dead}.tmp"]  # fmt: skip
    kept = [tmp_path / f".labels.tif.cog-{os.getpid()}9.tmp.tif",  # recent: maybe a writer on another host
            tmp_path / f".labels.tif.tiled-{os.getppid()}.tmp.tif",  # a live process
            tmp_path / ".labels.tif.notes"]  # fmt: skip
    for p in stale + kept:
        p.write_bytes(b"partial")
    for p in stale + kept[1:]:
        os.utime(p, (old, old))
    store = _copy(fresh_store, tmp_path / "s.zarr")
    stages.segment(store, FIXED, progress=False)
    stages.stitch(store, cog, StitchConfig(), progress=False)
    assert cog.is_file()
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
