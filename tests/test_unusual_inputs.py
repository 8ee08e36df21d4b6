"""Inputs that are unusual but valid go through every stage: a raster smaller than one
chunk and one window, 1 px wide or tall, float32 with NaN nodata, a nodata collar, and a
VRT mosaic of two files. Each result is checked against a whole-array oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr

from pipeline import stages
from pipeline.config import IngestConfig, SegmentConfig, StitchConfig, ThresholdConfig, UNetConfig
from tests import synth
from tests.models import tiny_unet
from tests.conftest import BAND_NAMES

THRESHOLD = 2200.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_unet(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=1)


def _threshold(store: Path) -> np.ndarray:
    cfg = SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="B03", value=THRESHOLD))
    stages.segment(store, cfg, progress=False)
    return xr.open_zarr(store)["labels"].values


def _unet(store: Path, model: Path) -> np.ndarray:
    cfg = SegmentConfig(method="unet", unet=UNetConfig(model=model, window=64, overlap=0.25, batch_size=4,
                                                       device="cpu"))  # fmt: skip
    stages.segment(store, cfg, progress=False)
    return xr.open_zarr(store)["labels"].values


def _expected_threshold(img: np.ndarray, nodata) -> np.ndarray:
    b03 = img[BAND_NAMES.index("B03")].astype(np.float64)
    want = (b03 > THRESHOLD).astype(np.uint8)
    invalid = ~np.isfinite(b03) if nodata is None or np.isnan(nodata) else (b03 == nodata)
    want[invalid] = 255
    return want


@pytest.mark.parametrize("shape", [(40, 50), (300, 1), (1, 300), (1, 1)], ids=["tiny", "1px-wide", "1px-tall", "1px"])
def test_small_and_thin_rasters_through_every_stage(shape, tiny_model, tmp_path):
    h, w = shape
    classes = synth.class_map(max(h, 8), max(w, 8), n_classes=3, seed=7)[:h, :w]
    img = synth.bands_from_classes(classes, seed=8)
    tif = synth.write_tif(tmp_path / "in.tif", img, nodata=0, names=BAND_NAMES)
    runs = {}
    for chunk in (16, 512):  # several chunks, and one chunk bigger than the raster
        store = stages.ingest([tif], tmp_path / f"c{chunk}.zarr", IngestConfig(chunk_size=chunk), progress=False)
        np.testing.assert_array_equal(xr.open_zarr(store)["image"].values, img)
        np.testing.assert_array_equal(_threshold(store), _expected_threshold(img, 0))
        runs[chunk] = _unet(store, tiny_model)
        assert runs[chunk].shape == (h, w) and set(np.unique(runs[chunk])) <= {0, 1, 2}
        cog = stages.stitch(store, tmp_path / f"c{chunk}.tif", StitchConfig(blocksize=256), progress=False)
        with rasterio.open(cog) as ds:
            assert (ds.height, ds.width) == (h, w)
            np.testing.assert_array_equal(ds.read(1), runs[chunk])
    # the U-Net's reflect padding and blending do not depend on the chunking, even 1 px wide
    np.testing.assert_array_equal(runs[16], runs[512])


def test_float32_with_nan_nodata(tmp_path):
    classes = synth.class_map(90, 120, seed=2)
    img = synth.bands_from_classes(classes, seed=3).astype(np.float32)
    img[:, 10:20, 30:60] = np.nan
    tif = synth.write_tif(tmp_path / "f.tif", img, nodata=float("nan"), names=BAND_NAMES)
    store = stages.ingest([tif], tmp_path / "f.zarr", IngestConfig(chunk_size=32), progress=False)
    ds = xr.open_zarr(store)
    assert ds["image"].dtype == np.float32
    np.testing.assert_array_equal(ds["image"].values, img)  # NaN == NaN for assert_array_equal
    labels = _threshold(store)
    np.testing.assert_array_equal(labels, _expected_threshold(img, float("nan")))
    assert (labels[10:20, 30:60] == 255).all()


def test_nodata_collar_is_nodata_in_the_labels(scene, tmp_path):
    store = stages.ingest([scene["tif"]], tmp_path / "s.zarr", IngestConfig(chunk_size=256), progress=False)
    labels = _threshold(store)
    np.testing.assert_array_equal(labels, _expected_threshold(scene["image"], 0))
    assert (labels[:5] == 255).all() and (labels[:, :5] == 255).all()
    assert (labels[5:, 5:] != 255).mean() > 0.999


def _vrt_mosaic(path: Path, parts: list[tuple[Path, int]], width: int, height: int, dtype: str) -> Path:
    """A GDAL VRT placing single-band-per-band GeoTIFFs side by side (``parts``: file, x offset)."""
    gdal_type = {"uint16": "UInt16"}[dtype]
    bands = []
    for b in range(1, 5):
        sources = []
        for file, xoff in parts:
            with rasterio.open(file) as ds:
                w, h = ds.width, ds.height
            sources.append(
                f"<SimpleSource><SourceFilename relativeToVRT='1'>{file.name}</SourceFilename>"
                f"<SourceBand>{b}</SourceBand><SrcRect xOff='0' yOff='0' xSize='{w}' ySize='{h}'/>"
                f"<DstRect xOff='{xoff}' yOff='0' xSize='{w}' ySize='{h}'/></SimpleSource>"
            )
        bands.append(f"<VRTRasterBand dataType='{gdal_type}' band='{b}'><Description>{BAND_NAMES[b - 1]}"
                     f"</Description><NoDataValue>0</NoDataValue>{''.join(sources)}</VRTRasterBand>")  # fmt: skip
    with rasterio.open(parts[0][0]) as ds:
        crs, t = ds.crs.to_wkt(), ds.transform
    geo = ", ".join(str(v) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    path.write_text(
        f"<VRTDataset rasterXSize='{width}' rasterYSize='{height}'><SRS>{crs}</SRS>"
        f"<GeoTransform>{geo}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )
    return path


def test_vrt_mosaic_of_two_files(tmp_path):
    classes = synth.class_map(150, 260, seed=5)
    img = synth.bands_from_classes(classes, seed=6)
    left = synth.write_tif(tmp_path / "left.tif", img[:, :, :100], nodata=0, names=BAND_NAMES)
    right = synth.write_tif(tmp_path / "right.tif", img[:, :, 100:], nodata=0, names=BAND_NAMES,
                            origin=(synth.ORIGIN[0] + 100 * 10.0, synth.ORIGIN[1]))  # fmt: skip
    vrt = _vrt_mosaic(tmp_path / "mosaic.vrt", [(left, 0), (right, 100)], 260, 150, "uint16")
    store = stages.ingest([vrt], tmp_path / "m.zarr", IngestConfig(chunk_size=64), progress=False)
    ds = xr.open_zarr(store)
    assert list(ds["image"].attrs["band_names"]) == BAND_NAMES
    np.testing.assert_array_equal(ds["image"].values, img)
    np.testing.assert_array_equal(_threshold(store), _expected_threshold(img, 0))
