"""Microscopy inputs: TIFF, BigTIFF, OME-TIFF, zarr and OME-Zarr read lazily as (band, y, x)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.errors import InputError, RasterIOError
from pipeline.io import microscopy as mio
from pipeline.io.microscopy import describe_microscopy, is_microscopy, read_microscopy, select_channels
from tests import synth


def _image(c: int, h: int, w: int, seed: int = 0, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (c, h, w)).astype(dtype)


@pytest.fixture()
def ome_tif(tmp_path):
    """A 3-channel tiled OME-TIFF (C, Y, X) = (3, 150, 130), pixel size x 650 nm, y 0.7 um (default unit)."""
    img = _image(3, 150, 130)
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, img, ome=True, tile=(32, 32), compression="zlib", metadata={
        "axes": "CYX", "Channel": {"Name": ["DAPI", "GFP", "mCherry"]},
        "PhysicalSizeX": 650, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.7,
    })  # fmt: skip
    return path, img


def test_ome_tiff_metadata_and_channel_selection(ome_tif):
    path, img = ome_tif
    info = describe_microscopy(path)
    assert info.kind == "ome-tiff" and info.axes == "CYX"
    assert info.shape == (3, 150, 130) and info.dtype == "uint16"
    assert info.channel_names == ["DAPI", "GFP", "mCherry"]
    assert info.pixel_size_um == pytest.approx((0.7, 0.65))  # 650 nm -> 0.65 um; y in the OME default unit um
    arr = read_microscopy(info, ["mCherry", 0], chunk=64)
    assert arr.shape == (2, 150, 130) and arr.chunks == ((2,), (64, 64, 22), (64, 64, 2))
    np.testing.assert_array_equal(arr.compute(), img[[2, 0]])
    assert select_channels(info, None) == [0, 1, 2]


def test_unknown_channel_and_bad_index_are_refused(ome_tif):
    info = describe_microscopy(ome_tif[0])
    with pytest.raises(InputError, match=r"unknown channel 'Cy5'.*0: DAPI, 1: GFP, 2: mCherry"):
        select_channels(info, ["Cy5"])
    with pytest.raises(InputError, match="index 3 is out of range"):
        read_microscopy(info, [3])


def test_tiff_is_read_block_by_block(ome_tif, monkeypatch):
    """Every read asks for at most one chunk (all channels kept, no whole-image read), and the
    graph pickles (paths, not open files) for distributed workers."""
    path, img = ome_tif
    keys = []
    original = mio._TiffArray.__getitem__

    def spy(self, key):
        keys.append(key)
        return original(self, key)

    monkeypatch.setattr(mio._TiffArray, "__getitem__", spy)
    arr = read_microscopy(path, chunk=64)
    pickle.loads(pickle.dumps(arr))
    np.testing.assert_array_equal(arr[:, 70:90, 10:20].compute(), img[:, 70:90, 10:20])
    assert keys and all((k[1].stop - k[1].start) <= 64 and (k[2].stop - k[2].start) <= 64 for k in keys)
    assert len(keys) == 3  # one block (64 x 64) per channel plane, nothing else


def test_bigtiff_plain_tiff_has_no_pixel_size(tmp_path):
    img = _image(1, 90, 70, seed=1, dtype=np.float32)[0]
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img, bigtiff=True, tile=(32, 32), resolution=(300, 300))  # DPI is not a pixel size
    info = describe_microscopy(path)
    assert info.bigtiff and info.kind == "tiff" and info.axes == "YX"
    assert info.shape == (1, 90, 70) and info.channel_names == ["ch0"] and info.pixel_size_um is None
    np.testing.assert_array_equal(read_microscopy(info, chunk=32).compute()[0], img)


def test_rgb_samples_become_bands(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    info = describe_microscopy(path)
    assert info.axes == "YXS" and info.shape == (3, 40, 50) and info.channel_names == ["R", "G", "B"]
    np.testing.assert_array_equal(read_microscopy(info, ["B", "R"], chunk=16).compute(), rgb.transpose(2, 0, 1)[[2, 0]])


def test_imagej_pixel_size(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, _image(2, 30, 40), imagej=True, resolution=(1 / 0.25, 1 / 0.5),
                     metadata={"axes": "CYX", "unit": "um", "Labels": ["a", "b"]})  # fmt: skip
    info = describe_microscopy(path)
    assert info.kind == "imagej-tiff" and info.channel_names == ["a", "b"]
    assert info.pixel_size_um == pytest.approx((0.5, 0.25))


@pytest.mark.parametrize("axis", ["Z", "T"])
def test_z_or_t_longer_than_one_is_refused(tmp_path, axis):
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, _image(3, 20, 20), ome=True, metadata={"axes": f"{axis}YX"})
    with pytest.raises(InputError, match=f"axis {axis} has 3 "):
        describe_microscopy(path)


def test_axes_override_and_singleton_axes(tmp_path):
    img = _image(2, 20, 30)
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, img)  # tifffile's shaped metadata: axes 'QYX' (unknown)
    with pytest.raises(InputError, match="axis Q has 2 entries.*pass axes"):
        describe_microscopy(path)
    np.testing.assert_array_equal(read_microscopy(path, [1], chunk=16, axes="CYX").compute(), img[[1]])
    five = zarr.create_array(str(tmp_path / "tczyx.zarr"), shape=(1, 2, 1, 20, 30), dtype=img.dtype,
                             chunks=(1, 1, 1, 8, 8), dimension_names=("t", "c", "z", "y", "x"))  # fmt: skip
    five[:] = img[None, :, None]  # T = Z = 1 are fine
    info = describe_microscopy(tmp_path / "tczyx.zarr")
    assert info.axes == "TCZYX" and info.shape == (2, 20, 30)
    np.testing.assert_array_equal(read_microscopy(info, chunk=16).compute(), img)


def test_plain_zarr_arrays(tmp_path):
    img = _image(2, 40, 30, seed=3)
    z3 = zarr.create_array(str(tmp_path / "a.zarr"), shape=img.shape, dtype=img.dtype, chunks=(1, 16, 16),
                           dimension_names=("band", "y", "x"))  # fmt: skip
    z3[:] = img
    z3.attrs["band_names"] = ["red", "nir"]
    info = describe_microscopy(tmp_path / "a.zarr")
    assert info.kind == "zarr" and info.axes == "CYX" and info.channel_names == ["red", "nir"]
    np.testing.assert_array_equal(read_microscopy(info, ["nir"], chunk=16).compute(), img[[1]])
    z2 = zarr.open_array(str(tmp_path / "b.zarr"), mode="w", shape=(40, 30), dtype="u2", chunks=(16, 16), zarr_format=2)
    z2[:] = img[0]
    info = describe_microscopy(tmp_path / "b.zarr")
    assert info.axes == "YX" and info.shape == (1, 40, 30) and info.pixel_size_um is None
    np.testing.assert_array_equal(read_microscopy(info).compute()[0], img[0])


def test_ome_zarr_written_by_ome_zarr_py(tmp_path):
    """Level 0, channel labels and the pixel size (nanometre units -> um) of an image written by ome-zarr-py."""
    from ome_zarr.writer import write_image

    img = _image(2, 64, 48, seed=4)
    group = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    write_image(img, group, axes="cyx", scale={"c": 1.0, "y": 400.0, "x": 200.0},
                axes_units={"y": "nanometer", "x": "nanometer"})  # fmt: skip
    from ome_zarr.writer import add_metadata

    add_metadata(group, {"omero": {"channels": [{"label": "DAPI"}, {"label": "actin"}]}})
    info = describe_microscopy(tmp_path / "img.ome.zarr")
    assert info.kind == "ome-zarr" and info.axes == "CYX" and info.shape == (2, 64, 48)
    assert info.channel_names == ["DAPI", "actin"]
    assert info.pixel_size_um == pytest.approx((0.4, 0.2))
    np.testing.assert_array_equal(read_microscopy(info, ["actin"], chunk=32).compute(), img[[1]])


def test_zarr_group_without_ngff_and_missing_file(tmp_path):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("image", shape=(4, 4), dtype="u1")
    with pytest.raises(InputError, match=r"without NGFF 'multiscales'.*\['image'\]"):
        describe_microscopy(tmp_path / "g.zarr")
    with pytest.raises(RasterIOError, match="not found"):
        describe_microscopy(tmp_path / "nope.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(RasterIOError, match="not a readable TIFF"):
        describe_microscopy(tmp_path / "junk.tif")


def test_is_microscopy_tells_geotiffs_apart(ome_tif, tmp_path):
    geo = synth.write_tif(tmp_path / "geo.tif", np.zeros((1, 8, 8), np.uint8))
    assert is_microscopy(ome_tif[0]) and not is_microscopy(geo)
    zarr.create_array(str(tmp_path / "a.zarr"), shape=(4, 4), dtype="u1")
    assert is_microscopy(tmp_path / "a.zarr") and not is_microscopy(tmp_path / "missing.tif")
