"""Training on a small crop of the real sample scene: the loss falls, runs are reproducible,
and the saved model is complete and loads without pickle."""

import json

import numpy as np
import pytest
import torch

from pipeline import stages
from pipeline.config import BBox, ClassInfo, GroundTruthConfig, IngestConfig, TrainConfig
from pipeline.errors import InputError
from pipeline.io.sample import fetch_sample
from pipeline.segment.unet import load_model, load_spec
from tests import synth

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


def _small(tmp_path, **kw) -> TrainConfig:
    x0, y1 = synth.ORIGIN  # 10 m pixels: rows 0-63 train, rows 64-127 validate
    base = dict(arch="Unet", encoder="resnet18", encoder_depth=2, decoder_channels=[16, 8],
                train_area=BBox(xmin=x0, ymin=y1 - 640, xmax=x0 + 1280, ymax=y1),
                val_area=BBox(xmin=x0, ymin=y1 - 1280, xmax=x0 + 1280, ymax=y1 - 640),
                tile=64, stride=64, epochs=1, patience=5, batch_size=4, seed=0, device="cpu",
                out=tmp_path / "m.safetensors")  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory):
    """A 128 x 128 px 4-band raster and its 3-class label raster (ids 0, 1, 2; nodata 255)."""
    d = tmp_path_factory.mktemp("small")
    classes = synth.class_map(128, 128, 3, seed=7)
    tif = synth.write_tif(d / "img.tif", synth.bands_from_classes(classes, 4, seed=8), names=["B02", "B03", "B04", "B08"])
    store = stages.ingest([tif], d / "s.zarr", IngestConfig(chunk_size=64), progress=False)
    return store, classes, d


THREE = [ClassInfo(name=n) for n in ("a", "b", "c")]


def test_label_values_that_are_not_class_ids_are_refused_before_training(small_scene, tmp_path):
    """Codes {0, 3, 7} for 3 classes: a one-line error naming the values and class_map (it was
    torch's 'IndexError: Target 7 is out of bounds' after the chips were read)."""
    store, classes, _ = small_scene
    codes = np.array([0, 3, 7], np.uint8)[classes]
    gt = synth.write_tif(tmp_path / "codes.tif", codes, nodata=255)
    with pytest.raises(InputError, match=r"labeled pixels of the training area have values \[3, 7\] that are not "
                                         r"class ids 0\.\.2 .*class_map") as info:  # fmt: skip
        stages.train(store, _small(tmp_path), GroundTruthConfig(path=gt), THREE, progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "m.safetensors").exists()
    mapped = GroundTruthConfig(path=gt, class_map={0: "a", 3: "b", 7: "c"})  # the remedy the message names
    assert stages.train(store, _small(tmp_path), mapped, THREE, progress=False).is_file()


def test_areas_without_labels_are_refused_with_the_area_named(small_scene, tmp_path):
    store, classes, _ = small_scene
    half = classes.copy()
    half[:64] = 255  # the training rows unlabeled
    gt = synth.write_tif(tmp_path / "half.tif", half, nodata=255)
    with pytest.raises(InputError, match=r"no training chip holds a labeled pixel; check train\.train_area"):
        stages.train(store, _small(tmp_path), GroundTruthConfig(path=gt), THREE, progress=False)
    half = classes.copy()
    half[64:] = 255  # the validation rows unlabeled: no epoch could be chosen (it saved best_val_miou -1.0)
    gt = synth.write_tif(tmp_path / "half2.tif", half, nodata=255)
    with pytest.raises(InputError, match=r"no validation chip holds a labeled pixel.*train\.val_area"):
        stages.train(store, _small(tmp_path), GroundTruthConfig(path=gt), THREE, progress=False)


def test_ground_truth_outside_the_image_names_the_image(small_scene, tmp_path):
    store, classes, _ = small_scene
    gt = synth.write_tif(tmp_path / "far.tif", classes, nodata=255, origin=(500000.0, 5822040.0))
    with pytest.raises(InputError, match=r"does not overlap the image"):
        stages.train(store, _small(tmp_path), GroundTruthConfig(path=gt), THREE, progress=False)


def test_a_failed_retraining_leaves_the_previous_model_and_its_log(small_scene, tmp_path, monkeypatch):
    """The epoch log is written under NAME.partial.log.jsonl and renamed with the saved model;
    the weights and the sidecar are renamed into place, and a pair from two saves is refused."""
    import os

    from pipeline.errors import InputError as Refused
    from pipeline.segment import training

    store, classes, _ = small_scene
    gt = GroundTruthConfig(path=synth.write_tif(tmp_path / "gt.tif", classes, nodata=255))
    first = stages.train(store, _small(tmp_path, out=tmp_path / "m.safetensors"), gt, THREE, progress=False)
    log, sidecar = first.with_suffix(".log.jsonl"), first.with_suffix(".json")
    before = {p: p.read_bytes() for p in (first, log, sidecar)}
    assert not first.with_suffix(".partial.log.jsonl").exists()
    assert os.stat(first).st_mode & 0o044 == 0o044 & ~_umask()  # readable by others as umask allows

    def dies(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the epochs

    monkeypatch.setattr(training, "train", dies)
    with pytest.raises(KeyboardInterrupt):
        stages.train(store, _small(tmp_path, out=first, epochs=3), gt, THREE, progress=False)
    assert {p: p.read_bytes() for p in (first, log, sidecar)} == before
    monkeypatch.undo()

    other = stages.train(store, _small(tmp_path, out=tmp_path / "o.safetensors"), gt, THREE, progress=False)
    sidecar.write_bytes(other.with_suffix(".json").read_bytes())  # new sidecar next to the old weights
    with pytest.raises(Refused, match="come from two different saves"):
        load_model(first)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_train_command_does_not_train_on_a_store_of_other_inputs(small_scene, tmp_path, monkeypatch):
    """`tileseg train` ingests as `run` does: a store of other inputs is refused (it trained on
    it, without a word), and --overwrite re-ingests the config's inputs."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.io import store as zstore

    _, classes, d = small_scene
    three = synth.write_tif(tmp_path / "three.tif", synth.bands_from_classes(classes, 3, seed=8),
                            names=["B02", "B03", "B04"])  # fmt: skip
    gt = synth.write_tif(tmp_path / "gt.tif", classes, nodata=255)
    x0, y1 = synth.ORIGIN
    area = lambda top, bottom: {"xmin": x0, "ymin": y1 - bottom, "xmax": x0 + 1280, "ymax": y1 - top}  # noqa: E731
    cfg = {"inputs": [str(d / "img.tif")], "output_dir": str(tmp_path / "out"), "classes": ["a", "b", "c"],
           "ingest": {"chunk_size": 64}, "evaluate": {"ground_truth": {"path": str(gt)}},
           "dask": {"progress": False},
           "train": {"arch": "Unet", "encoder_depth": 2, "decoder_channels": [16, 8], "tile": 64, "stride": 64,
                     "epochs": 1, "batch_size": 4, "device": "cpu", "train_area": area(0, 640),
                     "val_area": area(640, 1280), "out": str(tmp_path / "m.safetensors")}}  # fmt: skip
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["train", str(tmp_path / "train.yaml")])
    assert res.exit_code == 0, res.output
    assert load_spec(tmp_path / "m.safetensors").bands == ["B02", "B03", "B04", "B08"]
    other = ["--set", f"inputs=[{three}]", "--set", "train.out=" + str(tmp_path / "m3.safetensors")]
    res = CliRunner().invoke(app, ["train", str(tmp_path / "train.yaml"), *other])
    assert res.exit_code == 1 and "belongs to another run" in res.output, res.output
    assert not (tmp_path / "m3.safetensors").exists()
    res = CliRunner().invoke(app, ["train", str(tmp_path / "train.yaml"), *other, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert load_spec(tmp_path / "m3.safetensors").bands == ["B02", "B03", "B04"]
    assert zstore.open_store(tmp_path / "out" / "scene.zarr")["image"].attrs["band_names"] == ["B02", "B03", "B04"]
