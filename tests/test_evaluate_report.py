"""Evaluation end to end on small synthetic rasters: chunking invariance, image validity,
ignored classes, ground truth in another CRS or on another grid, vector ground truth with
class maps and buffered lines, evaluation areas, the error map, the report files, and
``tileseg compare``."""

import hashlib
import json
import re

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import LineString, Point, box
from sklearn.metrics import confusion_matrix, jaccard_score

from pipeline import stages
from pipeline.config import AreaConfig, BBox, GroundTruthConfig, PredictionConfig
from pipeline.errors import ConfigError, InputError
from pipeline.metrics import chunk_counts, semantic_metrics
from tests import synth

H, W, K = 150, 210, 4
NAMES = ["bare", "crop", "forest", "water"]  # id 0 is a real class
X0, Y1 = synth.ORIGIN


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """150 x 210 px on EPSG:32633 at 10 m: truth, a noisy prediction (255 nodata sprinkled),
    a ground-truth raster (255 unlabeled stripe, raw value 9 = clouds to ignore), and a
    4-band image whose 'all bands 0' pixels are nodata."""
    d = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(11)
    truth = synth.class_map(H, W, K, seed=3)
    pred = truth.copy()
    noise = rng.random((H, W)) < 0.25
    pred[noise] = rng.integers(0, K, size=noise.sum())
    pred[rng.random((H, W)) < 0.03] = 255
    gt = truth.copy()
    gt[:, 100:112] = 255
    gt[rng.random((H, W)) < 0.04] = 9
    image = synth.bands_from_classes(truth, n_bands=4, seed=4)
    dead = np.zeros((H, W), bool)
    dead[40:60, 20:70] = True
    image[:, dead] = 0
    image[0, 0:10, 150:160] = 0  # one band 0 only: still valid
    return {
        "dir": d, "truth": truth, "pred": pred, "gt": gt, "dead": dead,
        "pred_tif": synth.write_tif(d / "pred.tif", pred, nodata=255),
        "gt_tif": synth.write_tif(d / "gt.tif", gt, nodata=255),
        "image_tif": synth.write_tif(d / "image.tif", image, nodata=0, names=["B02", "B03", "B04", "B08"]),
    }  # fmt: skip


def _gt(s, ignore=(9,)):
    """The fixture's ground truth, with the raw value 9 (clouds) ignored."""
    return GroundTruthConfig(path=s["gt_tif"], ignore_classes=list(ignore))


def _independent_mask(s, area=None):
    keep = ~s["dead"] & (s["gt"] != 255) & (s["gt"] != 9) & (s["pred"] != 255)
    return keep if area is None else keep & area


AREA = BBox(xmin=X0 + 200, ymin=Y1 - 1300, xmax=X0 + 1900, ymax=Y1 - 100)  # cols 20..189, rows 10..129


def _area_mask():
    m = np.zeros((H, W), bool)
    m[10:130, 20:190] = True
    return m


@pytest.mark.parametrize("chunk", [32, 77, 4096])
def test_dask_result_equals_in_memory_for_several_chunkings(small, chunk, tmp_path):
    s = small
    res = stages.evaluate(
        s["pred_tif"], _gt(s), NAMES, AREA, tmp_path, chunk,
        progress=False, image=s["image_tif"],
    )  # fmt: skip
    # in memory: the same kernel on whole arrays (habit 9's oracle) ...
    whole = chunk_counts(s["gt"], s["pred"], K, 255, 255, _area_mask(), image_valid=~s["dead"], gt_ignore=[9])
    np.testing.assert_array_equal(res.metrics.confusion.ravel(), whole[: K * K])
    expected = semantic_metrics(whole[: K * K].reshape(K, K))
    for name in ("miou", "frequency_weighted_iou", "micro_iou", "overall_accuracy", "mean_class_accuracy", "cohens_kappa"):
        assert getattr(res.metrics, name) == getattr(expected, name), name
    # ... and scikit-learn on an independently built mask
    keep = _independent_mask(s, _area_mask())
    np.testing.assert_array_equal(res.metrics.confusion, confusion_matrix(s["gt"][keep], s["pred"][keep], labels=range(K)))
    ex = res.metrics.excluded
    assert ex["outside_area"] == (~_area_mask()).sum()
    assert ex["nodata_image"] == (_area_mask() & s["dead"]).sum()
    assert ex["ignored_ground_truth"] == (_area_mask() & ~s["dead"] & (s["gt"] == 9)).sum()
    assert sum(ex.values()) + res.metrics.evaluated_pixels == H * W
    # the error map is the same for every chunking: 1 correct, 2 wrong, 0 excluded, 255 no prediction
    with rasterio.open(res.error_map) as err:
        got = err.read(1)
    want = np.where(s["gt"] == s["pred"], 1, 2)
    want[~keep] = 0
    want[s["pred"] == 255] = 255
    np.testing.assert_array_equal(got, want)


def test_error_map_is_a_cog_on_the_prediction_grid(small, tmp_path):
    res = stages.evaluate(small["pred_tif"], _gt(small), NAMES, None, tmp_path, 64,
                          progress=False)  # fmt: skip
    with rasterio.open(res.error_map) as err, rasterio.open(small["pred_tif"]) as pred:
        assert (err.crs, err.transform, err.shape, err.nodata) == (pred.crs, pred.transform, pred.shape, pred.nodata)
        assert err.dtypes[0] == "uint8"
        cmap = err.colormap(1)
        assert cmap[1][:3] == (26, 152, 80) and cmap[2][:3] == (215, 48, 39) and cmap[255][3] == 0
    assert cog_validate(str(res.error_map))[0]


def test_report_json_has_provenance_and_areas(small, tmp_path):
    res = stages.evaluate(small["pred_tif"], _gt(small), NAMES, None,
                          tmp_path, 64, progress=False)  # fmt: skip
    doc = json.loads(res.report_json.read_text())
    assert doc["tileseg_version"] and re.fullmatch(r"sha256:[0-9a-f]{64}", doc["config_hash"])
    for key, path in (("prediction", small["pred_tif"]), ("ground_truth", small["gt_tif"])):
        assert doc["inputs"][key]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert doc["image_validity"].startswith("not available")
    # 10 m pixels in a metric UTM CRS: 100 m² = 0.01 ha per pixel
    assert doc["area_unit"] == "ha"
    for c in doc["classes"]:
        assert c["support_area"] == pytest.approx(c["support_pixels"] * 0.01)
        assert c["predicted_area"] == pytest.approx(c["predicted_pixels"] * 0.01)
    assert set(doc["aggregates"]) == {"macro_miou", "frequency_weighted_iou", "micro_iou", "overall_accuracy",
                                      "mean_class_accuracy", "cohens_kappa"}  # fmt: skip
    assert doc["aggregate_definitions"]["macro_miou"]["name"] == "macro mIoU"
    assert doc["excluded_pixels"]["total"] == sum(v for k, v in doc["excluded_pixels"].items() if k != "total")
    # the same settings hash the same; other settings differently
    again = stages.evaluate(small["pred_tif"], _gt(small), NAMES,
                            None, tmp_path / "b", 64, progress=False)  # fmt: skip
    other = stages.evaluate(small["pred_tif"], _gt(small, [9, "water"]), NAMES, None, tmp_path / "c",
                            64, progress=False)  # fmt: skip
    assert again.report["config_hash"] == doc["config_hash"] != other.report["config_hash"]
    md = res.report_md.read_text()
    assert "macro mIoU" in md and "Cohen's kappa" in md and "ignored ground truth" in md


def test_report_html_is_self_contained(small, tmp_path):
    res = stages.evaluate(small["pred_tif"], _gt(small), NAMES, AREA, tmp_path, 64,
                          progress=False, image=small["image_tif"])  # fmt: skip
    page = res.report_html.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page, re.I), "external URL in report.html"
    assert not re.search(r"<(script|link|iframe)\b", page, re.I)
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for fig_id in ("confusion-heatmap", "iou-bar-chart", "quicklook"):
        m = re.search(rf'<figure id="{fig_id}"><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
        assert m, fig_id
        import base64

        assert base64.b64decode(m.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    for name in NAMES:
        assert name in page
    assert "macro mIoU" in page and "frequency-weighted IoU" in page


def test_absent_class_is_not_applicable_and_listed(small, tmp_path):
    names = NAMES + ["snow"]  # nobody has snow
    five = stages.evaluate(small["pred_tif"], _gt(small), names, None, tmp_path / "5", 64,
                           progress=False)  # fmt: skip
    four = stages.evaluate(small["pred_tif"], _gt(small), NAMES, None, tmp_path / "4", 64,
                           progress=False)  # fmt: skip
    assert five.metrics.miou == pytest.approx(four.metrics.miou)
    doc = five.report
    snow = doc["classes"][4]
    assert snow["iou"] is None and snow["applicable"] is False
    assert doc["classes_not_applicable"] == [{"name": "snow", "reason": "absent from ground truth and prediction"}]
    assert "snow (absent from ground truth and prediction)" in five.report_md.read_text()


def test_prediction_nodata_override_and_ignored_prediction_class(small, tmp_path):
    s = small
    res = stages.evaluate(s["pred_tif"], _gt(s), NAMES, None,
                          tmp_path, 64, progress=False,
                          prediction=PredictionConfig(nodata=255, ignore_classes=["water"]))  # fmt: skip
    keep = (s["gt"] != 255) & (s["gt"] != 9) & (s["pred"] != 255) & (s["pred"] != 3)
    np.testing.assert_array_equal(res.metrics.confusion, confusion_matrix(s["gt"][keep], s["pred"][keep], labels=range(K)))
    assert res.metrics.not_applicable == {3: "ignored"}
    assert res.metrics.miou == pytest.approx(jaccard_score(s["gt"][keep], s["pred"][keep], labels=[0, 1, 2], average="macro"))


# --------------------------------------------------------------------------- ground truth on other grids
def _pred_tif(path, pred):
    return synth.write_tif(path, pred.astype(np.uint8), nodata=255)


@pytest.mark.parametrize("crs, res", [("EPSG:3857", 1.5), ("EPSG:4326", 1e-5)])
def test_ground_truth_in_another_crs_is_aligned(crs, res, tmp_path):
    """A known case: each ground-truth pixel in ``crs`` takes the class of the UTM pixel that
    its centre falls in. The GT pixels are ~1 m and the UTM pixels 10 m, so nearest-neighbour
    reprojection must give back exactly the UTM class map, and the confusion matrix is known."""
    rng = np.random.default_rng(8)
    h, w = 40, 50
    truth = rng.integers(0, 3, size=(h, w))
    pred = np.where(rng.random((h, w)) < 0.3, rng.integers(0, 3, size=(h, w)), truth)
    pred_tif = _pred_tif(tmp_path / "pred.tif", pred)
    from rasterio.warp import transform_bounds

    left, bottom, right, top = transform_bounds("EPSG:32633", crs, X0 - 30, Y1 - 10 * h - 30, X0 + 10 * w + 30, Y1 + 30)
    gw, gh = int(np.ceil((right - left) / res)), int(np.ceil((top - bottom) / res))
    cx = left + (np.arange(gw) + 0.5) * res
    cy = top - (np.arange(gh) + 0.5) * res
    xx, yy = np.meshgrid(cx, cy)
    ux, uy = Transformer.from_crs(crs, "EPSG:32633", always_xy=True).transform(xx, yy)
    col = np.floor((ux - X0) / 10).astype(int)
    row = np.floor((Y1 - uy) / 10).astype(int)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    gt = np.full((gh, gw), 255, np.uint8)
    gt[inside] = truth[row[inside], col[inside]]
    with rasterio.open(tmp_path / "gt.tif", "w", driver="GTiff", width=gw, height=gh, count=1, dtype="uint8", crs=crs,
                       transform=rasterio.Affine(res, 0, left, 0, -res, top), nodata=255) as dst:  # fmt: skip
        dst.write(gt, 1)
    out = stages.evaluate(pred_tif, GroundTruthConfig(path=tmp_path / "gt.tif"), ["a", "b", "c"], None, tmp_path, 16,
                          progress=False)  # fmt: skip
    np.testing.assert_array_equal(out.metrics.confusion, confusion_matrix(truth.ravel(), pred.ravel(), labels=[0, 1, 2]))
    assert out.metrics.excluded["unlabeled_ground_truth"] == 0


def test_ground_truth_on_a_finer_shifted_grid(tmp_path):
    """GT at 4 m with its origin 1.3 m east and 2.1 m south of the prediction's: a prediction
    pixel centre (x, y) falls in GT pixel (floor((gy0 - y) / 4), floor((x - gx0) / 4))."""
    rng = np.random.default_rng(9)
    h, w = 30, 40
    gx0, gy0 = X0 + 1.3, Y1 - 2.1
    gt = rng.integers(0, 3, size=(80, 105)).astype(np.uint8)
    synth.write_tif(tmp_path / "gt.tif", gt, res=4.0, nodata=255, origin=(gx0, gy0))
    xs = X0 + (np.arange(w) + 0.5) * 10
    ys = Y1 - (np.arange(h) + 0.5) * 10
    aligned = gt[np.floor((gy0 - ys) / 4).astype(int)][:, np.floor((xs - gx0) / 4).astype(int)]
    pred = rng.integers(0, 3, size=(h, w))
    out = stages.evaluate(_pred_tif(tmp_path / "pred.tif", pred), GroundTruthConfig(path=tmp_path / "gt.tif"),
                          ["a", "b", "c"], None, tmp_path, 16, progress=False)  # fmt: skip
    np.testing.assert_array_equal(out.metrics.confusion, confusion_matrix(aligned.ravel(), pred.ravel(), labels=[0, 1, 2]))


def test_raster_class_map(tmp_path):
    codes = np.array([[311, 311, 512, 0], [211, 512, 999, 311]], dtype=np.uint16)  # CORINE-like codes
    synth.write_tif(tmp_path / "gt.tif", codes, nodata=0)
    pred = np.array([[1, 0, 2, 0], [0, 2, 2, 1]], dtype=np.uint8)
    gt = GroundTruthConfig(path=tmp_path / "gt.tif", class_map={211: "crop", 311: "forest", 512: 2})
    out = stages.evaluate(_pred_tif(tmp_path / "p.tif", pred), gt, ["crop", "forest", "water"], None, tmp_path, 16,
                          progress=False)  # fmt: skip
    # 0 is nodata, 999 is not in the map: both unlabeled
    mapped = np.array([1, 1, 2, 0, 2, 1])
    got = np.array([1, 0, 2, 0, 2, 1])
    np.testing.assert_array_equal(out.metrics.confusion, confusion_matrix(mapped, got, labels=[0, 1, 2]))
    assert out.metrics.excluded["unlabeled_ground_truth"] == 2


# --------------------------------------------------------------------------- vector ground truth
def _grid_centres(h, w):
    xs = X0 + (np.arange(w) + 0.5) * 10
    ys = Y1 - (np.arange(h) + 0.5) * 10
    return np.meshgrid(xs, ys)


def test_vector_lines_are_buffered_and_class_mapped(tmp_path):
    """A farm polygon crossed by a road line (buffer 12 m each side) and a track outside it;
    OSM-style values mapped to classes. Expected pixels from distances of pixel centres."""
    h, w = 30, 40
    farm = box(X0 + 20, Y1 - 260, X0 + 330, Y1 - 40)
    road = LineString([(X0 - 50, Y1 - 60), (X0 + 450, Y1 - 227)])
    track = LineString([(X0 + 340, Y1 - 20), (X0 + 340, Y1 - 280)])
    gdf = gpd.GeoDataFrame({"kind": ["farmland", "primary", "track", "parking"]},
                           geometry=[farm, road, track, Point(X0 + 100, Y1 - 100).buffer(20)], crs="EPSG:32633")  # fmt: skip
    path = tmp_path / "gt.gpkg"
    gdf.to_file(path)
    xx, yy = _grid_centres(h, w)
    pts = gpd.GeoSeries(gpd.points_from_xy(xx.ravel(), yy.ravel()), crs="EPSG:32633")
    d_road = pts.distance(road).to_numpy().reshape(h, w)
    d_track = pts.distance(track).to_numpy().reshape(h, w)
    assert np.abs(d_road - 12).min() > 0.3 and np.abs(d_track - 12).min() > 0.3  # no pixel centre near a buffer edge
    in_farm = pts.within(farm).to_numpy().reshape(h, w)
    expected = np.full((h, w), 255)
    expected[in_farm] = 0
    expected[d_track < 12] = 1  # both lines are roads; 'parking' is not in the map, so it burns nothing
    expected[d_road < 12] = 1
    pred = np.zeros((h, w), np.uint8)
    gtc = GroundTruthConfig(path=path, class_column="kind", class_map={"farmland": "farm", "primary": "road", "track": 1},
                            line_buffer=12)  # fmt: skip
    out = stages.evaluate(_pred_tif(tmp_path / "p.tif", pred), gtc, ["farm", "road"], None, tmp_path, 16, progress=False)
    labelled = expected != 255
    np.testing.assert_array_equal(out.metrics.confusion,
                                  confusion_matrix(expected[labelled], pred[labelled], labels=[0, 1]))  # fmt: skip
    assert out.metrics.excluded["unlabeled_ground_truth"] == (~labelled).sum()
    assert (expected == 1).sum() > 50 and (expected == 0).sum() > 200  # the case is not trivial


def test_vector_lines_without_buffer_are_refused(tmp_path):
    gdf = gpd.GeoDataFrame({"c": ["a"]}, geometry=[LineString([(X0, Y1 - 5), (X0 + 100, Y1 - 5)])], crs="EPSG:32633")
    gdf.to_file(tmp_path / "l.geojson", driver="GeoJSON")
    pred = _pred_tif(tmp_path / "p.tif", np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match="line_buffer"):
        stages.evaluate(pred, GroundTruthConfig(path=tmp_path / "l.geojson", class_column="c"), ["a"], None, tmp_path,
                        16, progress=False)  # fmt: skip
    assert not list(tmp_path.glob("report.*")) and not list(tmp_path.glob("error_map*"))


def test_vector_in_another_crs_and_format_rasterizes_to_expected_pixels(tmp_path):
    """UTM boxes on 10 m pixel edges, stored in EPSG:4326 (edges densified) as a Shapefile with
    an integer class column: rasterized back onto the UTM grid they give the boxes' pixels."""
    h, w = 25, 30
    boxes = [box(X0 + 30, Y1 - 200, X0 + 250, Y1 - 20), box(X0 + 80, Y1 - 120, X0 + 150, Y1 - 60)]
    gdf = gpd.GeoDataFrame({"code": [7, 8]}, geometry=[b.segmentize(5) for b in boxes], crs="EPSG:32633")
    gdf.to_crs("EPSG:4326").to_file(tmp_path / "gt.shp")
    expected = np.full((h, w), 255)
    expected[2:20, 3:25] = 0
    expected[6:12, 8:15] = 1  # smaller polygon wins
    pred = np.where(np.random.default_rng(1).random((h, w)) < 0.5, 0, 1).astype(np.uint8)
    gtc = GroundTruthConfig(path=tmp_path / "gt.shp", class_column="code", class_map={7: "field", 8: "pond"})
    out = stages.evaluate(_pred_tif(tmp_path / "p.tif", pred), gtc, ["field", "pond"], None, tmp_path, 16,
                          progress=False)  # fmt: skip
    lab = expected != 255
    np.testing.assert_array_equal(out.metrics.confusion, confusion_matrix(expected[lab], pred[lab], labels=[0, 1]))
    assert out.report["inputs"]["ground_truth"]["of"].startswith("files gt.shp, gt.shx, gt.dbf")


def test_vector_without_overlap_names_both_extents(tmp_path):
    gdf = gpd.GeoDataFrame({"c": ["a"]}, geometry=[box(500000, 6000000, 500100, 6000100)], crs="EPSG:32633")
    gdf.to_file(tmp_path / "far.gpkg")
    pred = _pred_tif(tmp_path / "p.tif", np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match=r"far\.gpkg \(extent \(500000, 6000000, 500100, 6000100\)\) does not overlap "
                                         r"the prediction \(extent \(330000, 5821940, 330100, 5822040\)\)"):  # fmt: skip
        stages.evaluate(pred, GroundTruthConfig(path=tmp_path / "far.gpkg", class_column="c"), ["a"], None, tmp_path,
                        16, progress=False)  # fmt: skip


def test_unknown_class_in_class_map_is_a_config_error(small, tmp_path):
    gt = GroundTruthConfig(path=small["gt_tif"], class_map={1: "cropland"})
    with pytest.raises(ConfigError, match="cropland"):
        stages.evaluate(small["pred_tif"], gt, NAMES, None, tmp_path, 64, progress=False)


def test_incomplete_class_list_leaves_no_report(small, tmp_path):
    with pytest.raises(InputError, match="class list"):
        stages.evaluate(small["pred_tif"], _gt(small), NAMES[:3],
                        None, tmp_path, 64, progress=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no report, no error map, no temporary file


# --------------------------------------------------------------------------- evaluation areas
def test_area_as_polygons_or_mask_equals_the_expected_pixels(small, tmp_path):
    s = small
    inside = np.zeros((H, W), bool)
    inside[10:60, 20:90] = True  # polygon 1
    inside[80:120, 130:200] = True  # polygon 2
    polys = [box(X0 + 200, Y1 - 600, X0 + 900, Y1 - 100), box(X0 + 1300, Y1 - 1200, X0 + 2000, Y1 - 800)]
    gpd.GeoDataFrame(geometry=polys, crs="EPSG:32633").to_file(tmp_path / "area.geojson", driver="GeoJSON")
    mask = np.where(inside, 1, 0).astype(np.uint8)
    mask[0:5, :] = 255  # nodata counts as outside
    mask[12, 25] = 255
    inside_mask = inside.copy()
    inside_mask[12, 25] = False
    synth.write_tif(tmp_path / "mask.tif", mask, nodata=255)
    gt = _gt(s)
    for area, want in ((AreaConfig(polygons=tmp_path / "area.geojson"), inside), (AreaConfig(mask=tmp_path / "mask.tif"), inside_mask)):
        # one output folder per area: a report of other settings is never replaced without overwrite
        out = stages.evaluate(s["pred_tif"], gt, NAMES, area, tmp_path / area.describe()[:4], 64, progress=False)
        keep = (s["gt"] != 255) & (s["gt"] != 9) & (s["pred"] != 255) & want
        np.testing.assert_array_equal(out.metrics.confusion, confusion_matrix(s["gt"][keep], s["pred"][keep], labels=range(K)))
        assert out.metrics.excluded["outside_area"] == (~want).sum()


def test_area_outside_the_prediction_is_an_error(small, tmp_path):
    far = BBox(xmin=0, ymin=0, xmax=10, ymax=10)
    with pytest.raises(InputError, match=r"evaluation area bbox \(0, 0, 10, 10\).*does not overlap"):
        stages.evaluate(small["pred_tif"], _gt(small), NAMES, far, tmp_path, 64,
                        progress=False)  # fmt: skip


def test_image_store_on_another_grid(small, tmp_path):
    from pipeline.config import IngestConfig

    img = synth.write_tif(tmp_path / "img.tif", np.ones((2, 20, 30), np.uint16), nodata=0)
    store = stages.ingest([img], tmp_path / "other.zarr", IngestConfig(chunk_size=16), progress=False)
    with pytest.raises(InputError, match="not on the prediction's grid"):
        stages.evaluate(small["pred_tif"], _gt(small), NAMES, None, tmp_path / "a", 64, progress=False, image=store)
    # a guessed image (tileseg evaluate --config: the run's store) is skipped, and the report says so
    res = stages.evaluate(small["pred_tif"], _gt(small), NAMES, None, tmp_path / "b", 64, progress=False, image=store,
                          image_optional=True)  # fmt: skip
    assert res.report["image_validity"].startswith("not available: the store")
    assert "image" not in res.report["inputs"]
