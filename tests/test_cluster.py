"""Dask cluster choice: one worker per GPU with a GPU resource, U-Net tasks that ask for it
(exercised on CPU with a fake GPU resource), and chunk errors that name the chunk."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from pipeline import stages
from pipeline.cluster import dask_client, gpu_worker_specs, gpu_workers_present
from pipeline.config import DaskConfig, IngestConfig, SegmentConfig, UNetConfig
from pipeline.errors import InputError, RasterIOError
from tests import synth
from tests.models import BANDS, tiny_unet


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_unet(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=1)


@pytest.fixture(scope="module")
def tif(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu")
    img = synth.bands_from_classes(synth.class_map(96, 128, 3, seed=2), 4, seed=3)
    return synth.write_tif(d / "img.tif", img, names=BANDS)


def _unet(model) -> SegmentConfig:
    return SegmentConfig(method="unet", unet=UNetConfig(model=model, window=32, overlap=0.25, batch_size=4,
                                                        device="cpu"))  # fmt: skip


def test_one_worker_per_gpu_pinned_to_its_device():
    specs = gpu_worker_specs(2, DaskConfig(threads_per_worker=3, memory_limit="8GiB"))
    assert list(specs) == ["gpu-0", "gpu-1"]
    for i, spec in enumerate(specs.values()):
        opts = spec["options"]
        assert opts["env"] == {"CUDA_VISIBLE_DEVICES": str(i)} and opts["resources"] == {"GPU": 1}
        assert opts["nthreads"] == 3 and opts["memory_limit"] == "8GiB"
    # with CUDA_VISIBLE_DEVICES already narrowed, each worker gets one of those devices
    specs = gpu_worker_specs(2, DaskConfig(), visible="3,5")
    assert [s["options"]["env"]["CUDA_VISIBLE_DEVICES"] for s in specs.values()] == ["3", "5"]


def test_gpu_cluster_starts_one_pinned_worker_process_per_gpu(monkeypatch):
    """The cluster tileseg starts when GPUs are present (their count faked: CI has none):
    worker processes that each see one device and offer GPU=1."""
    import os

    from pipeline import cluster

    monkeypatch.setattr(cluster, "gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with dask_client(DaskConfig(n_workers=1, threads_per_worker=1, memory_limit="1GiB")) as client:
        seen = client.run(lambda: (os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")))
        assert sorted(v for _, v in seen.values()) == ["0", "1"]  # one device each ...
        assert len({pid for pid, _ in seen.values()} | {os.getpid()}) == 3  # ... in processes of their own
        info = client.scheduler_info()["workers"].values()
        assert all(w["resources"] == {"GPU": 1} for w in info) and gpu_workers_present(client)
    # threads cannot be pinned to a device: no GPU workers then
    with dask_client(DaskConfig(n_workers=1, processes=False)) as client:
        assert not gpu_workers_present(client)


def test_unet_tasks_run_on_the_gpu_worker_of_an_existing_cluster(tif, model, tmp_path):
    """A cluster whose one worker offers a (fake) GPU resource: every U-Net inference task
    runs there, and the labels equal a run without any cluster."""
    from distributed import Scheduler, SpecCluster, Worker, get_task_stream

    ref = stages.ingest([tif], tmp_path / "ref.zarr", IngestConfig(chunk_size=32), progress=False)
    stages.segment(ref, _unet(model), progress=False)  # Dask's local scheduler, no resources
    store = stages.ingest([tif], tmp_path / "s.zarr", IngestConfig(chunk_size=32), progress=False)
    workers = {"gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
               "cpu": {"cls": Worker, "options": {"nthreads": 2}}}  # fmt: skip
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster:
        with dask_client(DaskConfig(scheduler_address=cluster.scheduler_address)) as client:
            assert gpu_workers_present(client)
            names = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}
            with get_task_stream(client) as stream:
                stages.segment(store, _unet(model), progress=False)
    # one inference task per window block (one batch: 2 x 2 windows), each on the worker with
    # the GPU (the sums, argmax and chunk writes, which ask for nothing, may run anywhere).
    # 32 px windows at stride 24 starting at -4: 4 rows x 6 columns of windows, 2 x 3 blocks
    inference = [t for t in stream.data if "tileseg-unet" in str(t["key"])]
    assert len({str(t["key"]) for t in inference}) == 2 * 3
    assert {names[t["worker"]] for t in inference} == {"gpu"}
    np.testing.assert_array_equal(xr.open_zarr(store)["labels"].values, xr.open_zarr(ref)["labels"].values)


def test_no_gpu_resource_no_annotation(tif, model, tmp_path):
    """Without GPU workers the U-Net tasks ask for nothing (else they would wait forever)."""
    from distributed import LocalCluster

    store = stages.ingest([tif], tmp_path / "s.zarr", IngestConfig(chunk_size=64), progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        with dask_client(DaskConfig(scheduler_address=cluster.scheduler_address)) as client:
            assert not gpu_workers_present(client)
            stages.segment(store, _unet(model), progress=False)
    assert "labels" in xr.open_zarr(store)


def test_chunk_errors_name_stage_chunk_and_store(tif, model, tmp_path):
    """A damaged chunk of the image: the error keeps its type and says where it happened."""
    store = stages.ingest([tif], tmp_path / "s.zarr", IngestConfig(chunk_size=32), progress=False)
    (store / "image" / "c" / "0" / "1" / "2").write_bytes(b"not a zstd frame")
    with pytest.raises(RasterIOError, match=r"segment \(unet\) of .*s\.zarr, chunk \(\d, \d\) rows \d+:\d+ cols "
                                            r"\d+:\d+: cannot read image\["):  # fmt: skip
        stages.segment(store, _unet(model), progress=False)
    with pytest.raises(RasterIOError, match=r"segment \(threshold\) of .*s\.zarr, chunk \(1, 2\) rows 32:64 "
                                            r"cols 64:96: cannot read image\[32:64, 64:96\]"):  # fmt: skip
        stages.segment(store, SegmentConfig(method="threshold", threshold={"expression": "B03", "value": 1}),
                       progress=False)  # fmt: skip
    assert issubclass(RasterIOError, OSError) and not issubclass(InputError, OSError)


def test_chunk_errors_keep_their_type_and_errno_across_processes():
    """Errors travel from worker processes pickled; a full disk stays a full disk (no retries)."""
    import errno
    import pickle

    from flows.retry import is_transient
    from pipeline.apply import chunk_error
    from pipeline.errors import ChunkError

    info = {None: {"chunk-location": (0, 1, 2), "array-location": [(0, 4), (32, 64), (64, 96)]}}
    full = pickle.loads(pickle.dumps(chunk_error(OSError(errno.ENOSPC, "No space left"), "ingest -> s.zarr", info)))
    assert isinstance(full, RasterIOError) and full.errno == errno.ENOSPC and not is_transient(full)
    assert str(full) == "ingest -> s.zarr, chunk (1, 2) rows 32:64 cols 64:96: OSError: [Errno 28] No space left"
    flaky = pickle.loads(pickle.dumps(chunk_error(TimeoutError("read timed out"), "ingest", info)))
    assert isinstance(flaky, RasterIOError) and is_transient(flaky)
    bad = chunk_error(InputError("no such band"), "segment", info)
    assert type(bad) is InputError and str(bad).endswith(": no such band")
    bug = chunk_error(KeyError("k"), "segment", info)
    assert isinstance(bug, ChunkError) and "KeyError" in str(bug) and not isinstance(bug, OSError)


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_progress_in_a_log_is_one_line_per_update(scheduler, capsys, monkeypatch):
    """stdout that is not a terminal (a log file, a Prefect worker): each progress update is
    a line of its own, not hundreds of carriage-return redraws on one line."""
    import time

    import dask.array as da

    from pipeline import cluster

    monkeypatch.setattr(cluster, "LOG_PROGRESS_EVERY_S", 0.3)
    slow = da.ones((12,), chunks=1).map_blocks(lambda b: (time.sleep(0.1), b)[1])
    cfg = DaskConfig(scheduler=scheduler, n_workers=1, threads_per_worker=1, progress=True)
    with dask_client(cfg):
        capsys.readouterr()
        (total,) = cluster.compute(slow.sum(), label="slow sum", progress=True)
    assert total == 12
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    lines = [x for x in out.splitlines() if x.strip()]
    assert lines[0] == "[tileseg] slow sum"
    bars = lines[1:]
    assert len(bars) >= 2 and all("% Completed" in b for b in bars) and "100% Completed" in bars[-1]
    # a long interval between lines does not hold the stage back (Dask's bar waited for its timer)
    monkeypatch.setattr(cluster, "LOG_PROGRESS_EVERY_S", 60.0)
    with dask_client(cfg):
        t0 = time.perf_counter()
        cluster.compute(slow.sum(), label="slow sum", progress=True)
        took = time.perf_counter() - t0
    assert took < 30, took
    assert "100% Completed" in [x for x in capsys.readouterr().out.splitlines() if x.strip()][-1]
