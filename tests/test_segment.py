"""Classical segmentation: chunk-size invariance (the oracle test), Otsu from the global
histogram, expressions, k-means with majority-vote mapping."""

import logging

import numpy as np
import pytest
import xarray as xr
from skimage.filters import threshold_otsu

from pipeline import stages
from pipeline.config import (
    BBox,
    ClassInfo,
    GroundTruthConfig,
    IngestConfig,
    KMeansConfig,
    SegmentConfig,
    ThresholdConfig,
    load_config,
)
from pipeline.errors import ChunkError, ConfigError, InputError
from pipeline.segment.classical import Expression

CHUNKINGS = [128, 256, 512, 1024]  # 1024 > 1000 x 777: one single chunk

OTSU = SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="(B03 - B08) / (B03 + B08)"))
CLASSES = [ClassInfo(name=n) for n in ("a", "b", "c", "d")]


@pytest.fixture(scope="module")
def stores(scene, tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return {
        t: stages.ingest([scene["tif"]], d / f"t{t}.zarr", IngestConfig(chunk_size=t), progress=False)
        for t in CHUNKINGS
    }


def _labels(store, cfg, **kw):
    stages.segment(store, cfg, progress=False, **kw)
    return xr.open_zarr(store)["labels"]


def test_otsu_labels_identical_for_every_chunking(stores, scene):
    results = {t: _labels(s, OTSU) for t, s in stores.items()}
    ref = results[1024].values
    assert results[1024].attrs["otsu"] is True
    for t, lab in results.items():
        assert lab.chunks == xr.open_zarr(stores[t])["image"].chunks[1:]
        assert lab.attrs["threshold"] == results[1024].attrs["threshold"]
        np.testing.assert_array_equal(lab.values, ref, err_msg=f"T={t}")
    # nodata collar -> label nodata; both classes present elsewhere
    assert (ref[:5] == 255).all() and (ref[:, :5] == 255).all()
    assert set(np.unique(ref[5:, 5:])) == {0, 1}


def test_otsu_threshold_is_global_and_matches_skimage(stores, scene):
    lab = _labels(stores[128], OTSU)
    img = scene["image"].astype(np.float64)
    valid = (img[1] != 0) & (img[3] != 0)
    ndwi = (img[1][valid] - img[3][valid]) / (img[1][valid] + img[3][valid])
    edges = np.linspace(ndwi.min(), ndwi.max(), OTSU.threshold.bins + 1)
    counts, _ = np.histogram(ndwi, bins=edges)
    expected = threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2))
    assert lab.attrs["threshold"] == pytest.approx(expected, rel=1e-12)
    # and close to skimage's Otsu on the raw values (different binning)
    assert lab.attrs["threshold"] == pytest.approx(threshold_otsu(ndwi), abs=5e-3)


def test_fixed_threshold(stores, scene):
    cfg = SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="B04", value=2000))
    lab = _labels(stores[256], cfg).values
    b04 = scene["image"][2]
    inner = np.s_[5:, 5:]
    np.testing.assert_array_equal(lab[inner], (b04[inner] > 2000).astype(np.uint8))


def test_threshold_names_its_two_classes_and_says_when_more_are_given(stores, caplog):
    cfg = SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="B04", value=2000))
    with caplog.at_level("WARNING", logger="tileseg"):
        assert _labels(stores[256], cfg).attrs["class_names"] == ["below", "above"]
    assert not caplog.records
    with caplog.at_level("WARNING", logger="tileseg"):
        assert _labels(stores[256], cfg, classes=CLASSES).attrs["class_names"] == ["a", "b", "c", "d"]
    (record,) = caplog.records
    assert "'a' and 'b'" in record.getMessage() and "other 2 classes never appear" in record.getMessage()


def test_kmeans_fit_does_not_depend_on_the_thread_count():
    """scikit-learn sums per-thread partial centres: with 2 threads the centroids differed
    from 1 thread's in the last bits (and so did the segment key)."""
    from threadpoolctl import threadpool_limits

    from pipeline.segment.classical import fit_kmeans

    x = np.random.default_rng(0).normal(size=(5000, 4))
    with threadpool_limits(limits=2):
        two = fit_kmeans(x, 8, 0).centroids
    with threadpool_limits(limits=1):
        one = fit_kmeans(x, 8, 0).centroids
    np.testing.assert_array_equal(two, one)


def test_kmeans_labels_identical_for_every_chunking(stores):
    cfg = SegmentConfig(method="kmeans", kmeans=KMeansConfig(n_clusters=5, sample_size=20_000, seed=3))
    results = {t: _labels(s, cfg).values for t, s in stores.items()}
    for t, lab in results.items():
        np.testing.assert_array_equal(lab, results[1024], err_msg=f"T={t}")
    assert set(np.unique(results[1024])) == {0, 1, 2, 3, 4, 255}


def test_unmapped_kmeans_clusters_are_named_as_clusters_not_as_the_classes(stores, caplog):
    """Without map_to_classes, cluster 0 is not the first class: the labels say cluster_0..
    (they were named, coloured and scored as the config's classes)."""
    cfg = SegmentConfig(method="kmeans", kmeans=KMeansConfig(n_clusters=3, sample_size=5000, seed=3))
    with caplog.at_level(logging.WARNING, logger="tileseg"):
        lab = _labels(stores[1024], cfg, classes=[ClassInfo(name=n) for n in ("farm", "forest", "water")])
    assert lab.attrs["class_names"] == ["cluster_0", "cluster_1", "cluster_2"]
    assert any("not classes" in r.getMessage() for r in caplog.records)


def test_unmapped_kmeans_cannot_be_scored_against_ground_truth(repo_root):
    """A run (the flows call check_scorable first) refuses to score clusters as classes."""
    from pipeline.config import check_scorable

    unmapped = ["segment.method=kmeans", "segment.kmeans.map_to_classes=false"]
    with pytest.raises(ConfigError, match=r"cluster ids, not classes.*map_to_classes"):
        check_scorable(load_config(repo_root / "config" / "default.yaml", unmapped))
    check_scorable(load_config(repo_root / "config" / "default.yaml", [*unmapped, "evaluate.ground_truth=null"]))
    check_scorable(load_config(repo_root / "config" / "default.yaml", ["segment.method=kmeans"]))  # mapped
    # `tileseg run` refuses it before Prefect's temporary server starts (it took ~19 s to say so)
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["run", str(repo_root / "config" / "default.yaml")] + [a for u in unmapped for a in ("--set", u)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "cluster ids, not classes" in res.output and "prefect" not in res.output.lower()


def test_kmeans_majority_vote_recovers_classes_and_is_chunk_invariant(stores, scene):
    gt = GroundTruthConfig(path=scene["gt_tif"])
    train = BBox(xmin=330000, ymin=5822040 - 7770, xmax=330000 + 5000, ymax=5822040)  # west half
    cfg = SegmentConfig(
        method="kmeans",
        kmeans=KMeansConfig(n_clusters=8, sample_size=20_000, map_to_classes=True, train_area=train),
    )
    results = {t: _labels(s, cfg, classes=CLASSES, ground_truth=gt) for t, s in stores.items()}
    ref = results[1024].values
    for t, lab in results.items():
        np.testing.assert_array_equal(lab.values, ref, err_msg=f"T={t}")
    assert results[1024].attrs["class_names"] == ["a", "b", "c", "d"]
    # the synthetic classes are well separated: the mapping finds them
    inner = np.s_[5:, 5:]
    assert (ref[inner] == scene["classes"][inner]).mean() > 0.95


def test_expression_rejects_code_and_unknown_bands():
    names = ["B03", "B08"]
    assert Expression.parse("(B03 - B08) / (B03 + B08)", names).names == ("B03", "B08")
    for bad in ("__import__('os')", "B03.real", "B03 if B08 else 1", "[B03]", "B03 % 2"):
        with pytest.raises(ConfigError):
            Expression.parse(bad, names)
    with pytest.raises(InputError, match=r"\['B99'\]"):
        Expression.parse("B99 + B03", names)
    vals = Expression.parse("-B03 ** 2 / 4 + 1", names).evaluate({"B03": np.array([2.0]), "B08": np.array([0.0])})
    np.testing.assert_allclose(vals, [0.0])


def test_failed_segment_keeps_earlier_labels_and_names_the_chunk(scene, tmp_path):
    store = stages.ingest([scene["tif"]], tmp_path / "s.zarr", IngestConfig(chunk_size=256), progress=False)
    before = _labels(store, OTSU).values
    bad = SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="B03 + 9**9**9", value=1))
    # raised inside the Dask tasks, half-way through the write; the message names stage, store and chunk
    with pytest.raises(ChunkError, match=r"segment \(threshold\) of .*s\.zarr, chunk \(\d, \d\) rows \d+:\d+ "
                                         r"cols \d+:\d+: OverflowError"):  # fmt: skip
        stages.segment(store, bad, progress=False)
    ds = xr.open_zarr(store)
    # the unfinished labels stay under labels_partial (for a resumed run), never under labels
    np.testing.assert_array_equal(ds["labels"].values, before)
    assert ds["labels"].attrs["otsu"] is True


def test_otsu_on_a_constant_raster_is_a_clear_error(tmp_path):
    from tests import synth

    tif = synth.write_tif(tmp_path / "c.tif", np.full((2, 40, 30), 7, np.uint16), names=["B03", "B08"])
    store = stages.ingest([tif], tmp_path / "c.zarr", IngestConfig(chunk_size=64), progress=False)
    with pytest.raises(InputError, match="Otsu needs two values"):
        stages.segment(store, SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="B03")),
                       progress=False)  # fmt: skip
    assert "labels" not in xr.open_zarr(store)


def test_kmeans_and_threshold_take_infinite_values_as_missing(scene, tmp_path):
    """An inf block: k-means failed with scikit-learn's `Input X contains NaN`."""
    img = scene["image"].astype(np.float32)
    img[:, 100:150, 200:300] = np.inf
    from tests import synth

    tif = synth.write_tif(tmp_path / "inf.tif", img, names=["B02", "B03", "B04", "B08"])
    store = stages.ingest([tif], tmp_path / "s.zarr", IngestConfig(chunk_size=256), progress=False)
    for cfg in (SegmentConfig(method="kmeans", kmeans=KMeansConfig(n_clusters=3, sample_size=5000)), OTSU):
        lab = _labels(store, cfg).values
        assert (lab[100:150, 200:300] == 255).all()
        assert (lab[200:, 400:] != 255).all()
