"""Microscopy outputs: OME-Zarr image + labels pyramids read by ome-zarr-py, and tiled label TIFFs."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import tifffile
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Labels, Multiscales, Reader

from pipeline.errors import InputError
from pipeline.io.ome import n_levels, write_label_tiff, write_ome_zarr

H, W = 301, 187  # odd sizes: the last row / column of each level is a half block


@pytest.fixture()
def arrays():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 4000, (2, H, W)).astype(np.uint16)
    labels = rng.integers(0, 70_000, (H, W)).astype(np.uint32)  # ids beyond uint16
    return image, labels


def _nodes(path):
    return list(Reader(parse_url(str(path)))())


def _mean_2x2_oracle(a: np.ndarray) -> np.ndarray:
    """2 x 2 block mean with the last row / column repeated, in float64 then rounded (numpy only)."""
    c, h, w = a.shape
    p = np.concatenate([a, a[:, -1:]], axis=1) if h % 2 else a
    p = np.concatenate([p, p[:, :, -1:]], axis=2) if w % 2 else p
    return np.rint(p.reshape(c, p.shape[1] // 2, 2, p.shape[2] // 2, 2).astype(np.float64).mean(axis=(2, 4)))


def test_ome_zarr_multiscales_and_labels(arrays, tmp_path):
    image, labels = arrays
    out = write_ome_zarr(
        tmp_path / "cells.ome.zarr", da.from_array(image, chunks=(2, 64, 64)), ["DAPI", "GFP"], (0.5, 0.25),
        labels=da.from_array(labels, chunks=64), label_name="nuclei", label_colors={1: (255, 0, 0, 255)},
        chunk=64, progress=False,
    )  # fmt: skip
    nodes = _nodes(out)
    img_node = nodes[0]
    assert img_node.load(Multiscales) is not None
    levels = n_levels(H, W, 64)
    assert levels == 4 and len(img_node.data) == levels  # 301 -> 151 -> 76 -> 38 <= 64
    meta = img_node.metadata
    assert [(a["name"], a["type"]) for a in meta["axes"]] == [("c", "channel"), ("y", "space"), ("x", "space")]
    assert all(a.get("unit") == "micrometer" for a in meta["axes"][1:])
    assert meta["channel_names"] == ["DAPI", "GFP"]
    ome = json.loads((out / "zarr.json").read_text())["attributes"]["ome"]
    assert ome["version"] == "0.5"  # NGFF 0.5 on zarr v3, as ome-zarr-py 0.18 writes
    assert [d["path"] for d in ome["multiscales"][0]["datasets"]] == ["0", "1", "2", "3"]
    for k, transforms in enumerate(meta["coordinateTransformations"]):
        scale = transforms[0]["scale"]
        assert scale == pytest.approx([1.0, 0.5 * 2**k, 0.25 * 2**k])  # doubles per level, in um
        assert transforms[1]["translation"] == pytest.approx([0.0, 0.25 * (2**k - 1), 0.125 * (2**k - 1)])
        assert img_node.data[k].shape == (2, -(-H // 2**k), -(-W // 2**k))
    np.testing.assert_array_equal(np.asarray(img_node.data[0]), image)
    np.testing.assert_array_equal(np.asarray(img_node.data[1]), _mean_2x2_oracle(image))
    np.testing.assert_array_equal(np.asarray(img_node.data[2]), _mean_2x2_oracle(_mean_2x2_oracle(image)))

    label_nodes = [n for n in nodes if n.load(Label) is not None]
    assert any(n.load(Labels) is not None for n in nodes)
    assert len(label_nodes) == 1
    lab = label_nodes[0]
    assert lab.metadata["name"] == "nuclei" and lab.metadata["color"][1] == pytest.approx([1.0, 0.0, 0.0, 1.0])
    assert [a["name"] for a in lab.metadata["axes"]] == ["y", "x"]
    assert lab.metadata["coordinateTransformations"] == meta_yx(meta["coordinateTransformations"])
    lev0 = np.asarray(lab.data[0])
    assert lev0.dtype == np.uint32
    np.testing.assert_array_equal(lev0, labels)
    lev1, lev3 = np.asarray(lab.data[1]), np.asarray(lab.data[3])
    np.testing.assert_array_equal(lev1, labels[::2, ::2])  # nearest: never a value that is not an id
    np.testing.assert_array_equal(lev3, labels[::8, ::8])


def meta_yx(transforms):
    """The image's transforms without the channel axis."""
    return [[{**t, t["type"]: t[t["type"]][1:]} for t in level] for level in transforms]


def test_ome_zarr_without_pixel_size_is_in_pixels(arrays, tmp_path):
    image, _ = arrays
    out = write_ome_zarr(tmp_path / "px.zarr", da.from_array(image[:1, :100, :90], chunks=32), ["c0"], None,
                         chunk=32, progress=False)  # fmt: skip
    node = _nodes(out)[0]
    assert all("unit" not in a for a in node.metadata["axes"])
    assert [t[0]["scale"] for t in node.metadata["coordinateTransformations"]] == [[1, 1, 1], [1, 2, 2], [1, 4, 4]]
    assert not (out / "labels").exists()


def test_ome_zarr_is_published_atomically(arrays, tmp_path):
    image, labels = arrays
    out = tmp_path / "o.zarr"
    write_ome_zarr(out, da.from_array(image, chunks=(2, 64, 64)), ["a", "b"], chunk=64, progress=False)

    def boom(block):
        raise RuntimeError("worker died")

    failing = da.from_array(image, chunks=(2, 64, 64)).map_blocks(boom, dtype=image.dtype)
    with pytest.raises(RuntimeError, match="worker died"):
        write_ome_zarr(out, failing, ["a", "b"], chunk=64, progress=False)
    np.testing.assert_array_equal(np.asarray(_nodes(out)[0].data[0]), image)  # the earlier store is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]
    with pytest.raises(InputError, match="labels shape"):
        write_ome_zarr(out, da.from_array(image), ["a", "b"], labels=da.from_array(labels[:10]), progress=False)
    with pytest.raises(InputError, match="integer ids"):
        write_ome_zarr(out, da.from_array(image), ["a", "b"], labels=da.from_array(labels * 0.5), progress=False)
    (tmp_path / "f.zarr").write_text("x")
    with pytest.raises(InputError, match="not a zarr store"):
        write_ome_zarr(tmp_path / "f.zarr", da.from_array(image), ["a", "b"], progress=False)


@pytest.mark.parametrize("bigtiff", [None, True])
def test_label_tiff_round_trip(arrays, tmp_path, bigtiff):
    _, labels = arrays
    out = write_label_tiff(da.from_array(labels, chunks=(100, 64)), tmp_path / "labels.tif", tile=32,
                           bigtiff=bigtiff, pixel_size_um=(0.5, 0.25))  # fmt: skip
    with tifffile.TiffFile(out) as tif:
        page = tif.pages.first
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (32, 32)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert tif.is_bigtiff == bool(bigtiff)  # small files stay classic TIFFs unless forced
        assert page.resolution == pytest.approx((1e4 / 0.25, 1e4 / 0.5))  # pixels per cm, (x, y)
        back = tif.asarray()
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)
    assert [p.name for p in tmp_path.iterdir()] == ["labels.tif"]


def test_label_tiff_refuses_bad_input(tmp_path):
    with pytest.raises(InputError, match="integer ids"):
        write_label_tiff(da.zeros((10, 10), dtype=np.float32), tmp_path / "x.tif")
    with pytest.raises(InputError, match="multiple of 16"):
        write_label_tiff(da.zeros((10, 10), dtype=np.uint8), tmp_path / "x.tif", tile=20)
    assert not list(tmp_path.iterdir())
