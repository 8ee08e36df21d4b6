"""Training on a small crop of the real sample scene: the loss falls, runs are reproducible,
and the saved model is complete and loads without pickle."""

import json

import numpy as np
import pytest
import torch

from pipeline import stages
from pipeline.config import BBox, ClassInfo, GroundTruthConfig, IngestConfig, TrainConfig
from pipeline.io.sample import fetch_sample
from pipeline.segment.unet import load_model, load_spec

CLASSES = [ClassInfo(name=n) for n in ("farm", "forest", "grass", "meadow", "residential", "scrub", "water", "wetland")]


@pytest.fixture(scope="module")
def real_store(repo_root, tmp_path_factory):
    scene = fetch_sample(repo_root / "data" / "cache")
    bands = sorted((scene / "IMG_DATA").glob("*_B0[2348].jp2"))  # the four 10 m bands
    store = stages.ingest(bands, tmp_path_factory.mktemp("real") / "s.zarr", IngestConfig(chunk_size=256, nodata=0),
                          progress=False)  # fmt: skip
    gt = GroundTruthConfig(path=scene / "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg", class_column="fclass")
    return store, gt


def _cfg(tmp_path, **kw) -> TrainConfig:
    # a 2.56 x 2.56 km training crop and a 1.28 x 2.56 km validation crop in the west of the scene
    base = dict(
        arch="Unet", encoder="resnet18", encoder_depth=2, decoder_channels=[16, 8],
        train_area=BBox(xmin=331000, ymin=5816000, xmax=333560, ymax=5818560),
        val_area=BBox(xmin=333560, ymin=5816000, xmax=334840, ymax=5818560),
        tile=64, stride=64, epochs=6, patience=10, batch_size=8, lr=3e-3, seed=1, device="cpu",
        out=tmp_path / "m.safetensors",
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_the_loss_and_saves_a_complete_model(real_store, tmp_path):
    store, gt = real_store
    path = stages.train(store, _cfg(tmp_path), gt, CLASSES, progress=False)
    log = [json.loads(line) for line in path.with_suffix(".log.jsonl").read_text().splitlines()]
    assert len(log) == 6
    assert log[-1]["train_loss"] < 0.9 * log[0]["train_loss"], [e["train_loss"] for e in log]
    spec = load_spec(path)
    assert spec.bands == ["B02", "B03", "B04", "B08"]
    assert spec.classes == [c.name for c in CLASSES]
    assert len(spec.mean) == 4 and all(s > 0 for s in spec.std)
    assert 0 <= spec.trained["best_val_miou"] <= 1 and spec.trained["train_chips"] > 0
    net, _ = load_model(path)
    with torch.inference_mode():
        out = net(torch.zeros(1, 4, 64, 64))
    assert out.shape == (1, 8, 64, 64)


def test_training_is_deterministic_on_cpu(real_store, tmp_path):
    store, gt = real_store
    a = stages.train(store, _cfg(tmp_path / "a", epochs=2), gt, CLASSES, progress=False)
    b = stages.train(store, _cfg(tmp_path / "b", epochs=2), gt, CLASSES, progress=False)
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_refit_trains_again_on_training_and_validation_chips(real_store, tmp_path):
    store, gt = real_store
    path = stages.train(store, _cfg(tmp_path, epochs=3, refit=True), gt, CLASSES, progress=False)
    trained = load_spec(path).trained
    log = [json.loads(line) for line in path.with_suffix(".log.jsonl").read_text().splitlines()]
    assert 1 <= trained["refit_epochs"] == trained["best_epoch"] <= 3
    assert len(log) == 3 + trained["refit_epochs"]  # the early-stopped run, then the refit
    assert all(e["val_miou"] is None for e in log[3:])  # the refit has no validation left


def test_training_area_as_polygons(real_store, tmp_path):
    """A polygon training area: only chips with labeled pixels inside the polygon are used."""
    import geopandas as gpd
    from shapely.geometry import box

    store, gt = real_store
    poly = tmp_path / "area.geojson"
    gpd.GeoDataFrame(geometry=[box(331000, 5816000, 332280, 5817280)], crs="EPSG:32633").to_file(poly)
    from pipeline.config import AreaConfig

    path = stages.train(store, _cfg(tmp_path, epochs=1, train_area=AreaConfig(polygons=poly)), gt, CLASSES,
                        progress=False)  # fmt: skip
    with_poly = load_spec(path).trained["train_chips"]
    full = stages.train(store, _cfg(tmp_path / "f", epochs=1), gt, CLASSES, progress=False)
    assert 0 < with_poly <= 4  # a 128 x 128 px polygon holds at most 2 x 2 chips of 64 px
    assert load_spec(full).trained["train_chips"] > with_poly
