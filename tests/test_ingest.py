"""Ingest: georeferencing, band order and values round-trip; chunking does not change values."""

import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr
from affine import Affine

from pipeline import stages
from pipeline.config import GridConfig, IngestConfig
from pipeline.errors import InputError, RasterIOError
from tests import synth


@pytest.fixture(scope="module")
def multires(tmp_path_factory):
    d = tmp_path_factory.mktemp("multires")
    rng = np.random.default_rng(3)
    a = rng.integers(1, 5000, size=(2, 120, 96), dtype=np.uint16)  # 10 m
    b = rng.integers(1, 5000, size=(60, 48), dtype=np.uint16)  # 20 m
    c = rng.integers(1, 5000, size=(20, 16), dtype=np.uint16)  # 60 m
    paths = [
        synth.write_tif(d / "ten.tif", a, res=10, names=["R", "G"]),
        synth.write_tif(d / "scene_B20.tif", b, res=20),
        synth.write_tif(d / "scene_B60.tif", c, res=60),
    ]
    return d, paths, a, b, c


def _ingest(paths, store, **kw):
    grid = kw.pop("grid", GridConfig())
    return stages.ingest(paths, store, IngestConfig(grid=grid, **kw), progress=False)


def test_multires_roundtrip_crs_transform_order_values(multires, tmp_path):
    d, paths, a, b, c = multires
    store = _ingest(paths, tmp_path / "s.zarr", chunk_size=32, grid=GridConfig(resampling="nearest"))
    ds = xr.open_zarr(store)
    img = ds["image"]
    assert img.dims == ("band", "y", "x")
    assert img.shape == (4, 120, 96)
    assert img.rio.crs.to_epsg() == 32633
    assert ds.rio.transform() == Affine(10, 0, synth.ORIGIN[0], 0, -10, synth.ORIGIN[1])
    assert img.attrs["band_names"] == ["R", "G", "B20", "B60"]
    vals = img.values
    np.testing.assert_array_equal(vals[:2], a)
    np.testing.assert_array_equal(vals[2], np.repeat(np.repeat(b, 2, 0), 2, 1))
    np.testing.assert_array_equal(vals[3], np.repeat(np.repeat(c, 6, 0), 6, 1))
    assert img.chunks == ((4,), (32, 32, 32, 24), (32, 32, 32))
    # pixel-centre coordinates
    assert float(ds.x[0]) == synth.ORIGIN[0] + 5 and float(ds.y[0]) == synth.ORIGIN[1] - 5


def test_bilinear_ingest_does_not_depend_on_chunking(multires, tmp_path):
    d, paths, *_ = multires
    ref = xr.open_zarr(_ingest(paths, tmp_path / "one.zarr", chunk_size=1024))["image"].values
    for t in (16, 48):
        got = xr.open_zarr(_ingest(paths, tmp_path / f"t{t}.zarr", chunk_size=t))["image"].values
        np.testing.assert_array_equal(got, ref)


def test_coarser_target_resolution(multires, tmp_path):
    d, paths, *_ = multires
    ds = xr.open_zarr(_ingest(paths, tmp_path / "r.zarr", grid=GridConfig(resolution=20.0)))
    assert ds["image"].shape == (4, 60, 48)
    assert ds.rio.transform().a == 20.0


def test_nodata_and_band_names_kept(scene, tmp_path):
    ds = xr.open_zarr(_ingest([scene["tif"]], tmp_path / "s.zarr", chunk_size=256))
    assert ds["image"].attrs["nodata"] == 0
    assert ds["image"].rio.nodata == 0
    assert ds["image"].attrs["band_names"] == ["B02", "B03", "B04", "B08"]
    np.testing.assert_array_equal(ds["image"].values, scene["image"])


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(RasterIOError, match="not found"):
        _ingest([tmp_path / "nope.tif"], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_not_a_raster(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("this is not a GeoTIFF")
    with pytest.raises(RasterIOError, match="not a|cannot read"):
        _ingest([bad], tmp_path / "s.zarr")


def test_wrong_band_name_count(multires, tmp_path):
    d, paths, *_ = multires
    with pytest.raises(InputError, match="band_names"):
        _ingest(paths, tmp_path / "s.zarr", band_names=["x"])


def test_ingest_never_overwrites_what_is_not_a_store(multires, tmp_path):
    d, paths, *_ = multires
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "important.txt").write_text("precious")
    with pytest.raises(InputError, match="not a zarr store"):
        _ingest(paths, keep)
    assert (keep / "important.txt").read_text() == "precious"
    with pytest.raises(InputError, match="not a zarr store|one of the inputs"):
        _ingest(paths, paths[1])
    assert paths[1].is_file()


def test_a_band_off_the_grid_is_refused(tmp_path):
    import numpy as np

    a = synth.write_tif(tmp_path / "a_B03.tif", np.ones((50, 50), np.uint16))
    far = synth.write_tif(tmp_path / "far_B08.tif", np.ones((50, 50), np.uint16), origin=(930000.0, 5822040.0))
    with pytest.raises(InputError, match="does not overlap the target grid"):
        _ingest([a, far], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_open_datasets_are_reused_per_thread_and_never_stale(tmp_path):
    """Chunk reads of one ingest (a session) keep a file open per thread (pipeline.io.raster._reader):
    another session opens it afresh, a file rewritten under the same path is read afresh, a
    failed read drops its dataset, and a thread keeps at most 16 open."""
    import os

    from rasterio.windows import Window

    from pipeline.grid import Grid
    from pipeline.io import raster as rio

    def grid_of(path):
        info = rio.raster_info(path)
        return info.grid

    a = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    path = synth.write_tif(tmp_path / "a.tif", a)
    g: Grid = grid_of(path)
    w = Window(0, 0, 32, 32)
    s = "session-1"
    np.testing.assert_array_equal(rio.read_onto_grid(str(path), [1], g, w, session=s)[0], a[:32, :32])
    first = rio._reader(str(path), s)
    assert rio._reader(str(path), s) is first  # reused within a session ...
    other = rio._reader(str(path), "session-2")
    assert other is not first and first.closed  # ... and never by another one
    first = rio._reader(str(path), s)
    st = os.stat(path)
    synth.write_tif(path, a + 1)  # rewritten in place
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(rio.read_onto_grid(str(path), [1], g, w, session=s)[0], a[:32, :32] + 1)
    assert first.closed  # the stale dataset was closed, not leaked
    path.write_bytes(path.read_bytes()[:600])  # truncated: the read fails, and its dataset is dropped
    with pytest.raises(RasterIOError):
        rio.read_onto_grid(str(path), [1], g, w, session=s)
    assert all(k[0] != str(path) for k in rio._HANDLES.datasets)
    for i in range(20):
        p = synth.write_tif(tmp_path / f"f{i}.tif", a)
        rio.read_onto_grid(str(p), [1], g, w, session=s)
    assert len(rio._HANDLES.datasets) == 16
    before = dict(rio._HANDLES.datasets)
    rio.read_onto_grid(str(p), [1], g, w)  # without a session: opened and closed, nothing kept
    assert rio._HANDLES.datasets == before


def test_nan_nodata_of_several_bands_is_kept(tmp_path):
    """Four float32 bands with nodata NaN: {nan, nan, nan, nan} made four distinct set
    members, so the inputs were said to disagree and no nodata was used."""
    img = synth.bands_from_classes(synth.class_map(40, 50, seed=1), n_bands=4).astype(np.float32)
    img[:, :5] = np.nan
    tifs = [synth.write_tif(tmp_path / f"x_B0{i}.tif", img[i], nodata=np.nan) for i in range(4)]
    store = stages.ingest(tifs, tmp_path / "s.zarr", IngestConfig(chunk_size=32), progress=False)
    assert np.isnan(xr.open_zarr(store)["image"].attrs["nodata"])


def test_a_band_without_nodata_takes_the_others_and_different_values_are_refused(tmp_path, caplog):
    img = synth.bands_from_classes(synth.class_map(40, 50, seed=1), n_bands=3)
    full = [synth.write_tif(tmp_path / f"x_B0{i}.tif", img[i], nodata=0) for i in range(2)]
    # covers the top half of the grid only, and declares no nodata
    half = synth.write_tif(tmp_path / "x_half.tif", img[2, :20])
    with caplog.at_level("WARNING", logger="tileseg"):
        store = stages.ingest([*full, half], tmp_path / "s.zarr", IngestConfig(chunk_size=32), progress=False)
    assert "x_half.tif declare(s) no nodata value; using 0" in caplog.text
    ds = xr.open_zarr(store)
    assert ds["image"].attrs["nodata"] == 0
    assert (ds["image"].values[2, 20:] == 0).all()  # outside its extent: nodata, not data
    np.testing.assert_array_equal(ds["image"].values[2, :20], img[2, :20])
    other = synth.write_tif(tmp_path / "x_B09.tif", img[2], nodata=65535)
    with pytest.raises(InputError, match=r"different nodata values: 0 \(x_B00.tif\), 65535 \(x_B09.tif\)"):
        stages.ingest([*full, other], tmp_path / "o.zarr", IngestConfig(chunk_size=32), progress=False)


@pytest.mark.parametrize("value", [70000.0, -1.0, float("nan"), 2.5, float("inf")])
def test_a_nodata_value_the_dtype_cannot_hold_is_refused(scene, tmp_path, value):
    with pytest.raises(InputError, match="cannot occur in .*uint16.*ingest.nodata"):
        stages.ingest([scene["tif"]], tmp_path / "s.zarr", IngestConfig(chunk_size=256, nodata=value),
                      progress=False)  # fmt: skip


@pytest.mark.filterwarnings("ignore:Use `@` matmul:PendingDeprecationWarning")  # inside rasterio.warp
def test_a_band_in_another_crs_does_not_move_the_store_into_it(tmp_path, caplog):
    """The finest band was picked by comparing pixel sizes in degrees with metres: one
    EPSG:4326 band (about 0.0001 deg) took the whole store into EPSG:4326."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.warp import calculate_default_transform, reproject

    img = synth.bands_from_classes(synth.class_map(60, 80, seed=2), n_bands=3)
    utm = [synth.write_tif(tmp_path / f"x_B0{i}.tif", img[i], nodata=0) for i in range(2)]
    with rasterio.open(utm[0]) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height,
                                                               *src.bounds)  # fmt: skip
        geo = np.zeros((height, width), img.dtype)
        reproject(img[2], geo, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
                  dst_crs="EPSG:4326")  # fmt: skip
    deg = tmp_path / "x_B09.tif"
    with rasterio.open(deg, "w", driver="GTiff", width=width, height=height, count=1, dtype=geo.dtype,
                       crs="EPSG:4326", transform=transform, nodata=0) as dst:  # fmt: skip
        dst.write(geo[None])
    with caplog.at_level("INFO", logger="tileseg"):
        store = stages.ingest([*utm, deg], tmp_path / "s.zarr", IngestConfig(chunk_size=32), progress=False)
    ds = xr.open_zarr(store)
    assert ds.rio.crs == CRS.from_string(synth.CRS) and ds["image"].shape == (3, 60, 80)
    assert "inputs in 2 CRSs" in caplog.text and "x_B09.tif reprojected" in caplog.text
    np.testing.assert_array_equal(ds["image"].values[:2], img[:2])
