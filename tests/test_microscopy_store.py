"""Microscopy ingest into the tileseg store (pixel coordinates, no CRS), and the stages downstream."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import tifffile
from affine import Affine

from pipeline import stages
from pipeline.config import IngestConfig, MicroscopyConfig, SegmentConfig, StitchConfig, ThresholdConfig
from pipeline.errors import ConfigError, InputError
from pipeline.io import store as zstore


@pytest.fixture()
def cells(tmp_path):
    """An OME-TIFF (C, Y, X) = (2, 150, 130), channels DAPI and GFP, pixel size 0.325 um (x given in nm)."""
    img = np.random.default_rng(5).integers(0, 1000, (2, 150, 130)).astype(np.uint16)
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, img, ome=True, tile=(32, 32), metadata={
        "axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]},
        "PhysicalSizeX": 325, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.325, "PhysicalSizeYUnit": "µm",
    })  # fmt: skip
    return path, img


def test_ingest_writes_a_crs_less_store_that_opens(cells, tmp_path):
    path, img = cells
    store = stages.ingest_microscopy(path, tmp_path / "s.zarr", IngestConfig(chunk_size=64),
                                     MicroscopyConfig(channels=["GFP", "DAPI"]), progress=False)  # fmt: skip
    assert not list(tmp_path.glob(".s.zarr*"))  # published: no temporary left
    ds = zstore.open_store(store)
    grid = zstore.store_grid(ds)
    assert grid.crs_wkt is None and grid.transform == Affine.identity() and grid.shape == (150, 130)
    image = ds[zstore.IMAGE]
    assert image.attrs["band_names"] == ["GFP", "DAPI"]
    assert image.data.chunksize == (2, 64, 64)
    np.testing.assert_allclose(image.attrs["pixel_size_um"], [0.325, 0.325])
    np.testing.assert_allclose(ds.attrs["pixel_size_um"], [0.325, 0.325])
    np.testing.assert_array_equal(image.values, img[[1, 0]])
    np.testing.assert_array_equal(ds["x"].values[:2], [0.5, 1.5])  # pixel centres in pixel units


def test_pixel_size_override_and_unknown(cells, tmp_path):
    path, img = cells
    s1 = stages.ingest_microscopy(path, tmp_path / "a.zarr", IngestConfig(chunk_size=64),
                                  MicroscopyConfig(pixel_size_um=[0.5, 0.25]), progress=False)  # fmt: skip
    assert zstore.open_store(s1).attrs["pixel_size_um"] == [0.5, 0.25]
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, img[0])
    s2 = stages.ingest_microscopy(plain, tmp_path / "b.zarr", IngestConfig(chunk_size=64, band_names=["nuclei"]),
                                  progress=False)  # fmt: skip
    ds = zstore.open_store(s2)
    assert "pixel_size_um" not in ds.attrs and "pixel_size_um" not in ds[zstore.IMAGE].attrs
    assert ds[zstore.IMAGE].attrs["band_names"] == ["nuclei"]


def test_ingest_refuses_grid_options_and_bad_targets(cells, tmp_path):
    path, _ = cells
    with pytest.raises(ConfigError, match="ingest.grid"):
        stages.ingest_microscopy(path, tmp_path / "s.zarr", IngestConfig(grid={"resolution": 2.0}), progress=False)
    with pytest.raises(ConfigError, match="band_names has 1 names for 2 channels"):
        stages.ingest_microscopy(path, tmp_path / "s.zarr", IngestConfig(band_names=["x"]), progress=False)
    (tmp_path / "file.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a zarr store"):
        stages.ingest_microscopy(path, tmp_path / "file.txt", IngestConfig(), progress=False)
    assert (tmp_path / "file.txt").read_text() == "keep me"


def test_segment_and_stitch_work_on_a_crs_less_store(cells, tmp_path):
    """threshold -> labels -> COG in pixel coordinates: same shape, no CRS, identity transform."""
    path, img = cells
    store = stages.ingest_microscopy(path, tmp_path / "s.zarr", IngestConfig(chunk_size=64), progress=False)
    stages.segment(store, SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="DAPI", value=500)),
                   progress=False)  # fmt: skip
    cog = stages.stitch(store, tmp_path / "labels.tif", StitchConfig(blocksize=64), progress=False)
    with rasterio.open(cog) as src:
        assert src.crs is None and src.transform == Affine.identity() and src.shape == (150, 130)
        np.testing.assert_array_equal(src.read(1), (img[0] > 500).astype(np.uint8))


def test_export_ome_zarr_from_a_microscopy_store(cells, tmp_path):
    """ingest -> segment -> OME-Zarr: the reader finds the image in um and the labels as labels."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    path, img = cells
    store = stages.ingest_microscopy(path, tmp_path / "s.zarr", IngestConfig(chunk_size=64), progress=False)
    stages.segment(store, SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="GFP", value=300)),
                   progress=False)  # fmt: skip
    out = stages.export_ome_zarr(store, tmp_path / "cells.ome.zarr", label_name="foreground", progress=False)
    nodes = list(Reader(parse_url(str(out)))())
    assert nodes[0].metadata["channel_names"] == ["DAPI", "GFP"]
    assert nodes[0].metadata["coordinateTransformations"][0][0]["scale"] == pytest.approx([1, 0.325, 0.325])
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), img)
    (lab,) = [n for n in nodes if n.load(Label) is not None]
    assert lab.metadata["name"] == "foreground"
    np.testing.assert_array_equal(np.asarray(lab.data[0]), (img[1] > 300).astype(np.uint8))


@pytest.mark.parametrize("dtype, value", [("uint16", "65535"), ("float32", "-1")])
def test_the_tiffs_nodata_tag_is_kept(tmp_path, dtype, value):
    """A TIFF's GDAL_NODATA tag was ignored by the microscopy ingest: the nodata block was
    data (one 8,000 px instance, and another Otsu threshold)."""
    img = (np.random.default_rng(0).random((96, 80)) * 1000).astype(dtype)
    img[10:30, 20:40] = float(value)
    tif = tmp_path / "cells.tif"
    tifffile.imwrite(tif, img, extratags=[(42113, "s", 0, value, True)])
    store = stages.ingest_microscopy(tif, tmp_path / "s.zarr", IngestConfig(chunk_size=32), progress=False)
    attrs = zstore.open_store(store)[zstore.IMAGE].attrs
    assert attrs["nodata"] == float(value)
    if dtype == "uint16":
        with pytest.raises(InputError, match="cannot occur"):
            stages.ingest_microscopy(tif, tmp_path / "o.zarr", IngestConfig(chunk_size=32, nodata=-5), progress=False)
