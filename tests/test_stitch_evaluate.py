"""Stitch (COG) and evaluate, on a raster whose shape is not a multiple of the chunk size."""

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import xarray as xr
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import box
from sklearn.metrics import confusion_matrix

from pipeline import stages
from pipeline.config import BBox, ClassInfo, GroundTruthConfig, IngestConfig, SegmentConfig, StitchConfig, ThresholdConfig
from pipeline.errors import InputError
from pipeline.grid import Grid
from pipeline.io.vector import rasterize_window
from rasterio.windows import Window
from tests import synth

CLASSES = [ClassInfo(name="land", color="#00ff00"), ClassInfo(name="water", color="#0000ff")]


@pytest.fixture(scope="module")
def run(scene, tmp_path_factory):
    """1000 x 777 px through ingest (T=256) -> segment (Otsu) -> stitch."""
    d = tmp_path_factory.mktemp("run")
    store = stages.ingest([scene["tif"]], d / "s.zarr", IngestConfig(chunk_size=256), progress=False)
    stages.segment(store, SegmentConfig(method="threshold", threshold=ThresholdConfig()), CLASSES, progress=False)
    cog = stages.stitch(store, d / "out" / "labels.tif", StitchConfig(blocksize=256), CLASSES, progress=False)
    return {"dir": d, "store": store, "cog": cog, "labels": xr.open_zarr(store)["labels"].values}


def test_cog_keeps_grid_and_is_valid(run, scene):
    with rasterio.open(scene["tif"]) as src, rasterio.open(run["cog"]) as cog:
        assert (cog.height, cog.width) == (777, 1000) == (src.height, src.width)
        assert cog.transform == src.transform
        assert cog.crs == src.crs
        assert cog.nodata == 255
        assert cog.dtypes[0] == "uint8"
        assert cog.colormap(1)[0][:3] == (0, 255, 0) and cog.colormap(1)[1][:3] == (0, 0, 255)
        assert json.loads(cog.tags()["CLASS_NAMES"]) == ["land", "water"]
        np.testing.assert_array_equal(cog.read(1), run["labels"])
        overviews = cog.overviews(1)
        assert overviews, "COG has no overviews"
        for f in overviews:
            ov = cog.read(1, out_shape=(-(-cog.height // f), -(-cog.width // f)))
            assert set(np.unique(ov)) <= {0, 1, 255}
    valid, errors, _ = cog_validate(str(run["cog"]))
    assert valid, errors


def test_store_opens_with_crs(run):
    import rioxarray  # noqa: F401

    ds = xr.open_zarr(run["store"])
    assert ds["image"].rio.crs.to_epsg() == 32633
    assert ds["labels"].rio.crs.to_epsg() == 32633
    assert ds["labels"].shape == (777, 1000)
    assert ds["labels"].rio.transform() == ds["image"].rio.transform()


def _expected_cm(pred, gt, area=None):
    keep = (gt != 255) & (pred != 255)
    if area is not None:
        keep &= area
    return confusion_matrix(gt[keep], pred[keep], labels=[0, 1])


@pytest.mark.parametrize("chunk", [100, 256, 4096])
def test_evaluate_equals_in_memory_for_any_chunking(run, scene, chunk, tmp_path):
    gt = np.where(scene["gt"] == 255, 255, scene["gt"] % 2).astype(np.uint8)
    gt_tif = synth.write_tif(tmp_path / "gt2.tif", gt, nodata=255)
    res = stages.evaluate(run["cog"], GroundTruthConfig(path=gt_tif), None, None, tmp_path, chunk, progress=False)
    np.testing.assert_array_equal(res.metrics.confusion, _expected_cm(run["labels"], gt))
    assert res.class_names == ["land", "water"]
    assert res.metrics.excluded["unlabeled_ground_truth"] == ((gt == 255) & True).sum()
    report = json.loads(res.report_json.read_text())
    assert report["confusion_matrix"]["counts"] == res.metrics.confusion.tolist()
    assert "mIoU" in res.report_md.read_text()
    assert report["colours"] == {"land": "#00ff00", "water": "#0000ff"}  # the COG's colour table


def test_evaluate_area_and_shifted_ground_truth(run, scene, tmp_path):
    # ground truth written 3 px (30 m) further east: pred pixel (r, c) sees gt[r, c - 3]
    gt = np.where(scene["gt"] == 255, 255, scene["gt"] % 2).astype(np.uint8)
    shifted = synth.write_tif(tmp_path / "shift.tif", gt, nodata=255, origin=(330030.0, 5822040.0))
    area = BBox(xmin=332000, ymin=5814000, xmax=340000, ymax=5822040)  # columns 200..
    res = stages.evaluate(run["cog"], GroundTruthConfig(path=shifted), None, area, tmp_path, 256, progress=False)
    aligned = np.full_like(gt, 255)
    aligned[:, 3:] = gt[:, :-3]
    cols = 330000 + (np.arange(1000) + 0.5) * 10
    in_area = np.broadcast_to((cols >= 332000)[None, :], gt.shape)
    np.testing.assert_array_equal(res.metrics.confusion, _expected_cm(run["labels"], aligned, in_area))
    assert res.metrics.excluded["outside_area"] == (~in_area).sum()


def test_vector_rasterization_rule(tmp_path):
    # a big 'land' square with a smaller 'water' square inside it: the smaller one wins
    x0, y1 = synth.ORIGIN
    gdf = gpd.GeoDataFrame(
        {"cls": ["land", "water", "unknown"]},
        geometry=[box(x0, y1 - 200, x0 + 200, y1), box(x0 + 50, y1 - 100, x0 + 100, y1 - 50), box(x0, y1 - 30, x0 + 30, y1)],
        crs="EPSG:32633",
    )
    path = tmp_path / "gt.gpkg"
    gdf.to_file(path)
    grid = Grid(rasterio.crs.CRS.from_epsg(32633).to_wkt(), rasterio.Affine(10, 0, x0, 0, -10, y1), 30, 30)
    got = rasterize_window(path, "cls", ["land", "water"], grid, Window(0, 0, 30, 30), 255)
    expected = np.full((30, 30), 255, np.uint8)
    expected[:20, :20] = 0
    expected[5:10, 5:10] = 1
    np.testing.assert_array_equal(got, expected)
    # a window cut elsewhere gives the same pixels
    part = rasterize_window(path, "cls", ["land", "water"], grid, Window(7, 3, 11, 9), 255)
    np.testing.assert_array_equal(part, expected[3:12, 7:18])


def test_ground_truth_without_overlap_names_both_extents(run, tmp_path):
    far = synth.write_tif(tmp_path / "far.tif", np.zeros((10, 10), np.uint8), origin=(500000.0, 6000000.0))
    with pytest.raises(InputError, match=r"does not overlap.*extent"):
        stages.evaluate(run["cog"], GroundTruthConfig(path=far), None, None, tmp_path, 256, progress=False)


def test_stitch_without_labels_refuses(scene, tmp_path):
    store = stages.ingest([scene["tif"]], tmp_path / "s.zarr", IngestConfig(chunk_size=512), progress=False)
    with pytest.raises(InputError, match="no labels"):
        stages.stitch(store, tmp_path / "x.tif", StitchConfig(), CLASSES, progress=False)
    assert not (tmp_path / "x.tif").exists()


def test_evaluating_the_store_equals_evaluating_the_cog(run, scene, tmp_path):
    gt = GroundTruthConfig(path=scene["gt_tif"], nodata=255)
    names = ["a", "b", "c", "d"]
    # a COG with the store as its image == the store itself (which brings its own image)
    from_cog = stages.evaluate(run["cog"], gt, names, None, tmp_path / "c", 256, progress=False, image=run["store"])
    from_store = stages.evaluate(run["store"], gt, names, None, tmp_path / "s", 256, progress=False)
    np.testing.assert_array_equal(from_cog.metrics.confusion, from_store.metrics.confusion)
    assert from_cog.metrics.excluded == from_store.metrics.excluded
    # valid(image): the 5 px nodata collar (all bands 0) is excluded as image nodata, first
    collar = np.zeros((777, 1000), bool)
    collar[:5, :] = collar[:, :5] = True
    assert from_store.metrics.excluded["nodata_image"] == collar.sum()
    # without an image, the same pixels fall to the prediction's nodata, and the report says why
    plain = stages.evaluate(run["cog"], gt, names, None, tmp_path / "p", 256, progress=False)
    assert plain.metrics.excluded["nodata_image"] == 0
    assert plain.metrics.excluded["nodata_prediction"] == (collar & (scene["gt"] != 255)).sum()
    assert plain.report["image_validity"].startswith("not available")


def test_vector_ground_truth_on_threads_equals_single_thread(tmp_path):
    import dask

    from pipeline import apply

    rng = np.random.default_rng(5)
    x0, y1 = synth.ORIGIN
    boxes = [box(x0 + a, y1 - b - 300, x0 + a + 300, y1 - b) for a, b in rng.uniform(0, 2000, size=(40, 2))]
    gdf = gpd.GeoDataFrame({"cls": rng.choice(["land", "water"], 40)}, geometry=boxes, crs="EPSG:32633")
    gdf.to_file(tmp_path / "many.gpkg")
    grid = Grid(rasterio.crs.CRS.from_epsg(32633).to_wkt(), rasterio.Affine(10, 0, x0, 0, -10, y1), 230, 250)
    one = rasterize_window(tmp_path / "many.gpkg", "cls", ["land", "water"], grid, Window(0, 0, 250, 230), 255)
    lazy = apply.ground_truth(str(tmp_path / "many.gpkg"), grid, ((64,) * 3 + (38,), (64,) * 3 + (58,)), 255,
                              "cls", ["land", "water"], is_vector=True)  # fmt: skip
    with dask.config.set(scheduler="threads", num_workers=4):
        np.testing.assert_array_equal(lazy.compute(), one)
    assert (one != 255).mean() > 0.2


def test_prediction_without_crs_against_ground_truth_with_crs_is_refused(tmp_path):
    pred = synth.write_tif(tmp_path / "p.tif", np.zeros((20, 20), np.uint8), crs=None)
    gt = synth.write_tif(tmp_path / "g.tif", np.zeros((20, 20), np.uint8))
    with pytest.raises(InputError, match="has a CRS but"):
        stages.evaluate(pred, GroundTruthConfig(path=gt), ["a"], None, tmp_path / "r", 64, progress=False)
