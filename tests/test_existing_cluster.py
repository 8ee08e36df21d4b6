"""Running on an existing Dask cluster, as a user who has outgrown one machine does: workers
in another working directory, a wrong or empty scheduler, workers that die."""

from __future__ import annotations

import logging
import os
import re

import dask
import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cluster import compute, dask_client
from pipeline.config import DaskConfig, RunConfig, absolute_path, absolute_paths, load_config
from pipeline.errors import ChunkError, ConfigError, MissingFileError
from tests import synth

BANDS = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="module")
def worker_elsewhere(tmp_path_factory):
    """A LocalCluster of one worker process whose working directory is another folder, as on
    a machine of a real cluster: a relative path there names another file, or none."""
    from distributed import Client, LocalCluster

    elsewhere = tmp_path_factory.mktemp("worker-cwd")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.run(os.chdir, str(elsewhere))
            assert set(client.run(os.getcwd).values()) == {str(elsewhere)}
        yield cluster.scheduler_address


def test_relative_paths_work_on_workers_in_another_directory(worker_elsewhere, tmp_path, monkeypatch):
    """`tileseg ingest img.tif s.zarr` and `segment s.zarr` from the client's directory: the
    workers read and write the client's files (paths are made absolute before any task)."""
    here = tmp_path / "client"
    here.mkdir()
    img = synth.bands_from_classes(synth.class_map(64, 96, 3, seed=4), 4, seed=5)
    synth.write_tif(here / "img.tif", img, names=BANDS)
    monkeypatch.chdir(here)
    opts = ["--set", f"dask.scheduler_address={worker_elsewhere}", "--set", "dask.progress=false",
            "--set", "ingest.chunk_size=32"]  # fmt: skip
    res = CliRunner().invoke(app, ["ingest", "img.tif", "s.zarr", *opts])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["segment", "s.zarr", *opts, "--set", "segment.method=threshold",
                                   "--set", "segment.threshold.expression=B03"])  # fmt: skip
    assert res.exit_code == 0, res.output
    ds = xr.open_zarr(here / "s.zarr")
    np.testing.assert_array_equal(ds["image"].values, img)
    t = float(ds["labels"].attrs["threshold"])
    np.testing.assert_array_equal(ds["labels"].values, (img[1] > t).astype(np.uint8))


def test_absolute_paths_reach_every_nested_path(tmp_path):
    cfg = RunConfig.model_validate({
        "inputs": ["a.tif", "/vsicurl/https://example.org/b.tif", "~/c.tif"],
        "output_dir": "out/../run",
        "segment": {"method": "unet", "unet": {"model": "models/m.safetensors"}},
        "evaluate": {"ground_truth": {"path": "gt/labels.gpkg", "class_column": "cls"}},
    })  # fmt: skip
    got = absolute_paths(cfg, tmp_path)
    assert got.inputs[0] == tmp_path / "a.tif"
    assert str(got.inputs[1]) == str(cfg.inputs[1])  # GDAL's virtual file systems stay as written
    assert got.inputs[2] == absolute_path("~/c.tif") and got.inputs[2].is_absolute()
    assert got.output_dir == tmp_path / "run"
    assert got.segment.unet.model == tmp_path / "models" / "m.safetensors"
    assert got.evaluate.ground_truth.path == tmp_path / "gt" / "labels.gpkg"
    assert cfg.output_dir.as_posix() == "out/../run"  # the original is unchanged
    # the same relative config from two directories reads two different inputs: two runs
    assert absolute_paths(cfg, tmp_path / "x").config_hash() != got.config_hash()


def test_deploy_keeps_paths_as_written(repo_root):
    """prefect.yaml (committed) holds the config's paths as written, not this machine's."""
    import yaml

    from flows import deploy as dep

    cfg = load_config(repo_root / "config" / "default.yaml")
    doc = dep.prefect_yaml(cfg, dep.settings(cfg))
    params = doc["deployments"][0]["parameters"]["config"]
    assert params["output_dir"] == "outputs/default"
    assert all(not p.startswith("/") for p in params["inputs"])
    committed = yaml.safe_load((repo_root / "prefect.yaml").read_text())
    assert committed["deployments"][0]["parameters"]["config"]["inputs"] == params["inputs"]


def test_missing_input_on_a_worker_is_not_a_corrupt_file(tmp_path):
    """A file a worker cannot see: a MissingFileError (no retry) naming it, not 'corrupt'."""
    from rasterio.windows import Window

    from flows.retry import is_transient
    from pipeline.io.raster import read_window

    with pytest.raises(MissingFileError, match=r"input raster not found where the read ran: .*gone\.tif") as info:
        read_window(tmp_path / "gone.tif", Window(0, 0, 8, 8))
    assert "corrupt" not in str(info.value) and not is_transient(info.value)


@pytest.mark.parametrize("address", ["127.0.0.1:notaport", "foo://bar", "tcp//127.0.0.1:8786", "tcp://scheduler",
                                     "tcp://sched uler:8786"])  # fmt: skip
def test_malformed_scheduler_address_is_a_config_error(address):
    with pytest.raises(ConfigError, match=r"dask\.scheduler_address: .*is not a Dask scheduler address") as info:
        load_config(None, [f"dask.scheduler_address={address}"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("address", ["tcp://10.0.0.5:8786", "scheduler:8786", "tls://sched.example.org:8786",
                                     "tcp://[::1]:8786"])  # fmt: skip
def test_scheduler_addresses_that_dask_accepts(address):
    assert load_config(None, [f"dask.scheduler_address={address}"]).dask.scheduler_address == address


def test_a_scheduler_without_workers_is_reported(caplog):
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:
        with caplog.at_level(logging.INFO, logger="tileseg"):
            with dask_client(DaskConfig(scheduler_address=cluster.scheduler_address)):
                pass
    text = [r.getMessage() for r in caplog.records if r.name == "tileseg"]
    assert any("connecting to the scheduler" in t for t in text)
    assert any("has no workers yet" in t and cluster.scheduler_address in t for t in text)


def _die(block):
    os._exit(1)  # as the kernel's OOM killer ends a worker


def test_workers_killed_by_one_chunk_give_a_one_line_error_naming_it():
    """distributed gives up on a task whose workers died (KilledWorker): the error names the
    computation and the chunk (y, x), and the usual causes, on one line."""
    import dask.array as da
    from distributed import LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with dask_client(DaskConfig(scheduler_address=cluster.scheduler_address)):
                arr = da.zeros((64, 96), chunks=32, dtype=np.uint8).map_blocks(_die, meta=np.empty((0, 0), np.uint8))
                with pytest.raises(ChunkError) as info:
                    compute(arr, label="segment (test)", progress=False)
    msg = str(info.value)
    assert re.match(r"segment \(test\): 1 Dask worker died running chunk \([01], [012]\) of _die-", msg)
    assert "\n" not in msg
    assert "dask.memory_limit" in msg
