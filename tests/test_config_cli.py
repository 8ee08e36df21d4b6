"""Config validation, --set overrides, and the CLI's one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError

TILESEG = str(Path(sys.executable).with_name("tileseg"))


def test_default_config_is_valid(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    cfg = load_config(repo_root / "config" / "default.yaml")
    assert cfg.segment.method == "unet"
    assert cfg.segment.unet.model is not None and cfg.segment.unet.model.with_suffix(".json").is_file()
    assert cfg.class_names()[6] == "water"
    assert cfg.evaluate.area is not None and cfg.segment.kmeans.train_area is not None
    # training (west) and evaluation (east) areas do not overlap
    assert cfg.segment.kmeans.train_area.xmax <= cfg.evaluate.area.bbox.xmin


def test_set_overrides_are_typed(repo_root):
    cfg = load_config(
        repo_root / "config" / "default.yaml",
        ["segment.method=threshold", "ingest.chunk_size=256", "segment.threshold.value=0.1", "dask.scheduler_address=tcp://h:8786"],
    )
    assert cfg.segment.method == "threshold"
    assert cfg.ingest.chunk_size == 256
    assert cfg.segment.threshold.value == 0.1
    assert cfg.dask.scheduler_address == "tcp://h:8786"


@pytest.mark.parametrize(
    "override, field",
    [
        ("ingest.chunk_sise=256", "ingest.chunk_sise"),
        ("ingest.chunk_size=big", "ingest.chunk_size"),
        ("segment.method=magic", "segment.method"),
        ("stitch.overview_resampling=average", "stitch.overview_resampling"),
    ],
)
def test_bad_values_name_the_field(repo_root, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(repo_root / "config" / "default.yaml", [override])


def test_mapping_needs_ground_truth(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"segment": {"kmeans": {"map_to_classes": True}}}))
    with pytest.raises(ConfigError, match="map_to_classes"):
        load_config(p)


def test_method_none_needs_instances(repo_root):
    """`none` is for instance-only configs; without `instances` it used to run k-means."""
    with pytest.raises(ConfigError, match="segment.method 'none'"):
        load_config(repo_root / "config" / "default.yaml", ["segment.method=none"])
    assert load_config(repo_root / "config" / "nuclei.yaml").segment.method == "none"


def _run(*args, cwd=None):
    return subprocess.run([TILESEG, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_missing_input_is_one_line_error(tmp_path):
    r = _run("ingest", str(tmp_path / "missing.tif"), str(tmp_path / "s.zarr"), "--set", "dask.processes=false")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "not found" in err[0]
    assert not (tmp_path / "s.zarr").exists()


def test_cli_bad_config_is_one_line_error(tmp_path):
    r = _run("segment", str(tmp_path / "s.zarr"), "--set", "segment.method=magic")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "segment.method" in r.stderr


def test_cli_stages_end_to_end(scene, tmp_path):
    """ingest -> segment -> stitch -> evaluate through the console script, on a threads-only cluster."""
    sets = ["--set", "dask.processes=false", "--set", "dask.progress=false", "--set", "ingest.chunk_size=300"]
    store, cog = tmp_path / "s.zarr", tmp_path / "labels.tif"
    assert _run("ingest", str(scene["tif"]), str(store), *sets).returncode == 0
    r = _run("segment", str(store), *sets, "--set", "segment.method=threshold", "--set", "classes=[land, water]")
    assert r.returncode == 0, r.stderr
    assert _run("stitch", str(store), str(cog), *sets).returncode == 0
    gt = tmp_path / "gt.tif"
    from tests import synth
    import numpy as np

    synth.write_tif(gt, np.where(scene["gt"] == 255, 255, scene["gt"] % 2).astype(np.uint8), nodata=255)
    r = _run("evaluate", str(cog), str(gt), *sets, "--out-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert "mIoU" in r.stdout and (tmp_path / "rep" / "report.json").is_file()


def test_library_never_imports_prefect():
    code = (
        "import sys, pipeline, pipeline.stages, pipeline.cli, pipeline.apply, pipeline.cluster, pipeline.report;"
        "assert 'prefect' not in sys.modules, [m for m in sys.modules if m.startswith('prefect')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_existing_scheduler_address_is_used(scene, tmp_path):
    """dask.scheduler_address points the stages at an already running cluster."""
    from distributed import LocalCluster, get_task_stream

    from pipeline import stages
    from pipeline.cluster import current_client, dask_client
    from pipeline.config import DaskConfig, IngestConfig

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with dask_client(DaskConfig(scheduler_address=cluster.scheduler_address)) as client:
            assert current_client() is client
            with get_task_stream(client) as stream:
                stages.ingest([scene["tif"]], tmp_path / "s.zarr", IngestConfig(chunk_size=512), progress=False)
            # the existing cluster's worker read and wrote every chunk (2 x 2 chunks of 512 px; read+write fused)
            keys = [t["key"] for t in stream.data]
            writes = {k for k in keys if isinstance(k, tuple) and str(k[0]).startswith("store-map")}
            assert len(writes) == 4, writes
        assert cluster.scheduler.status.name == "running"  # an external cluster is left running
