"""Panoptic output: a semantic class map and instance ids together, in the store and as a
two-band COG, and panoptic quality per class against semantic + instance ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import xarray as xr

from pipeline import instance_stages, stages
from pipeline.config import (
    ClassInfo,
    GroundTruthConfig,
    IngestConfig,
    InstanceConfig,
    InstanceEvaluateConfig,
    SegmentConfig,
    ThresholdConfig,
)
from pipeline.object_metrics import panoptic_counts, panoptic_quality
from tests import synth

CLASSES = [ClassInfo(name="ground"), ClassInfo(name="building")]


def _disks(h: int, w: int, n: int, seed: int) -> np.ndarray:
    """(y, x) uint16 ids of ``n`` non-touching disks of radius 5-9 px (0 = background)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((h, w), np.uint16)
    yy, xx = np.mgrid[:h, :w]
    k = 0
    while k < n:
        r = rng.integers(5, 10)
        cy, cx = rng.integers(r + 2, h - r - 2), rng.integers(r + 2, w - r - 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        grown = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 3) ** 2
        if ids[grown].any():
            continue
        k += 1
        ids[disk] = k
    return ids


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("panoptic")
    ids = _disks(260, 330, 40, seed=3)
    rng = np.random.default_rng(4)
    band = np.where(ids > 0, 3000.0, 1000.0) + rng.normal(0, 80, ids.shape)
    img = np.stack([band, band * 0.5 + 200]).astype(np.uint16)
    tif = synth.write_tif(d / "scene.tif", img, names=["B03", "B08"])
    gt_class = synth.write_tif(d / "gt_class.tif", (ids > 0).astype(np.uint8), nodata=255)
    gt_ids = synth.write_tif(d / "gt_ids.tif", ids)
    store = stages.ingest([tif], d / "s.zarr", IngestConfig(chunk_size=96), progress=False)
    stages.segment(store, SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="B03")), CLASSES,
                   progress=False)  # fmt: skip
    cfg = InstanceConfig(bands=["B03"], sigma=1.0, max_diameter=20, min_distance=4, thing_classes=["building"])
    instance_stages.segment_instances(store, cfg, progress=False)
    instance_stages.panoptic_labels(store, cfg, progress=False)
    return {"dir": d, "ids": ids, "store": store, "cfg": cfg, "gt_class": gt_class, "gt_ids": gt_ids}


def test_panoptic_in_the_store_and_as_a_two_band_cog(scene):
    ds = xr.open_zarr(scene["store"])
    pan, labels, inst = ds["panoptic"].values, ds["labels"].values, ds["instances"].values
    assert pan.shape == (2,) + labels.shape and pan.dtype == np.uint32
    np.testing.assert_array_equal(pan[0], labels)
    np.testing.assert_array_equal(pan[1], np.where(labels == 1, inst, 0))  # ground is stuff: instance 0
    assert ds["panoptic"].attrs["components"] == ["class", "instance"]
    cog = instance_stages.export_panoptic_cog(scene["store"], scene["dir"] / "panoptic.tif", progress=False)
    with rasterio.open(cog) as src:
        assert src.count == 2 and src.dtypes == ("uint32", "uint32")
        assert src.crs == rasterio.crs.CRS.from_string(synth.CRS) and src.transform == rasterio.open(
            scene["dir"] / "scene.tif").transform
        np.testing.assert_array_equal(src.read(), pan)
        assert src.descriptions == ("class id", "instance id")


def test_panoptic_quality_per_class(scene):
    out = scene["dir"] / "rep"
    metrics = instance_stages.evaluate_panoptic(
        scene["store"], GroundTruthConfig(path=scene["gt_class"]), InstanceEvaluateConfig(ground_truth=scene["gt_ids"]),
        scene["cfg"], out, progress=False,
    )  # fmt: skip
    # oracle: the same definitions on the whole arrays at once, ground (0) as stuff
    ds = xr.open_zarr(scene["store"])
    pan = ds["panoptic"].values.astype(np.int64)
    ids = scene["ids"].astype(np.int64)
    whole = panoptic_quality(panoptic_counts((ids > 0).astype(np.int64), ids, pan[0], pan[1], void=3,
                                             stuff_classes=[0]), stuff_classes=[0])  # fmt: skip
    np.testing.assert_array_equal(metrics.tp, whole.tp)
    np.testing.assert_array_equal(metrics.fp, whole.fp)
    np.testing.assert_allclose(metrics.pq, whole.pq)
    # well separated bright disks: every building is found and matched
    k = list(metrics.classes).index(1)
    assert metrics.tp[k] == 40 and metrics.fn[k] == 0 and metrics.pq[k] > 0.85
    doc = json.loads((out / "report_panoptic.json").read_text())
    assert {c["name"] for c in doc["metrics"]["classes"]} == {"ground", "building"}
    assert "| building | things | 40 |" in (out / "report_panoptic.md").read_text()


def test_unknown_thing_class_is_refused(scene):
    from pipeline.errors import ConfigError

    bad = InstanceConfig(bands=["B03"], max_diameter=20, thing_classes=["roads"])
    with pytest.raises(ConfigError, match="roads"):
        instance_stages.panoptic_labels(scene["store"], bad, progress=False)


def test_georeferenced_instances_export_as_a_cog(scene):
    paths = instance_stages.export_instances(scene["store"], scene["dir"] / "exp", scene["cfg"], progress=False)
    assert set(paths) == {"cog"}  # no OME-Zarr for a georeferenced store unless asked
    ds = xr.open_zarr(scene["store"])
    with rasterio.open(paths["cog"]) as src:
        assert src.crs == rasterio.crs.CRS.from_string(synth.CRS) and src.dtypes[0] == str(ds["instances"].dtype)
        np.testing.assert_array_equal(src.read(1), ds["instances"].values)
