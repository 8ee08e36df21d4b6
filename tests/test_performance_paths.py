"""The code paths changed for speed by the benchmarks (README "Performance") give the same
results as the plain whole-array computation: Otsu on an integer band with one bin per value
(equal to skimage's ``threshold_otsu`` on the whole band), the fused index passes (one task
per chunk), Dask's threaded scheduler, the image codec and the direct reads."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from skimage.filters import threshold_otsu

from pipeline import apply, stages
from pipeline.cluster import dask_client
from pipeline.config import LABEL_NODATA, DaskConfig, IngestConfig, SegmentConfig, ThresholdConfig, load_config
from pipeline.errors import ConfigError, RasterIOError
from pipeline.io import store as zstore
from pipeline.segment.classical import Expression, integer_bin_edges
from tests import synth


def _bimodal(dtype, shape=(301, 377), seed=0) -> np.ndarray:
    """(2, y, x) two-class image of ``dtype`` with a nodata (0) collar of 3 px."""
    classes = synth.class_map(*shape, n_classes=2, seed=seed)
    rng = np.random.default_rng(seed)
    top = 200 if dtype == np.uint8 else 30000
    b1 = np.where(classes == 1, 0.7 * top, 0.3 * top) + rng.normal(0, 0.08 * top, shape)
    img = np.clip(np.stack([b1, top - b1]), 1, top).astype(dtype)
    img[:, :3] = 0
    img[:, :, :3] = 0
    return img


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_otsu_on_an_integer_band_equals_skimage_on_the_whole_band_for_every_chunking(tmp_path, dtype):
    img = _bimodal(dtype)
    tif = synth.write_tif(tmp_path / "s.tif", img, nodata=0, names=["A", "B"])
    valid = img[0] != 0
    expected_t = threshold_otsu(img[0][valid])  # skimage: one bin per integer value
    expected = np.where(valid, img[0] > expected_t, 255).astype(np.uint8)
    assert 0.2 < expected[valid].mean() < 0.8  # a real two-class split
    for chunk in (64, 100, 512):
        store = stages.ingest([tif], tmp_path / f"s{chunk}.zarr", IngestConfig(chunk_size=chunk), progress=False)
        stages.segment(store, SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="A")),
                       progress=False)  # fmt: skip
        lab = xr.open_zarr(store)["labels"]
        assert lab.attrs["threshold"] == float(expected_t)
        np.testing.assert_array_equal(lab.values, expected)


def test_integer_bin_edges_centre_a_bin_on_every_value():
    e = integer_bin_edges("uint8")
    assert len(e) == 257 and np.array_equal((e[:-1] + e[1:]) / 2, np.arange(256))
    assert len(integer_bin_edges("int16")) == 65537 and integer_bin_edges("int16")[0] == -32768.5
    assert integer_bin_edges("float32") is None and integer_bin_edges("uint32") is None


def test_fused_index_passes_equal_the_whole_array_computation():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 50, size=(3, 90, 130)).astype(np.float32)
    img[1, 10:20, 10:40] = -9  # nodata in a band the expression uses
    img[2, 50:60, :] = -9  # nodata in a band it does not use
    names = ["a", "b", "c"]
    expr = Expression.parse("(a - b) / (a + b)", names)  # a + b == 0 gives NaN / inf: invalid
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (img[0].astype(np.float64) - img[1]) / (img[0].astype(np.float64) + img[1])
    ok = np.isfinite(v) & (img[0] != -9) & (img[1] != -9)
    assert (~ok).sum() > 300 and (img[0] + img[1] == 0).any()
    edges = np.linspace(-1, 1, 33)
    index = apply.IndexKernel(expr, names, -9.0)
    for chunk in (17, 64, 200):
        image = da.from_array(img, chunks=(3, chunk, chunk))
        (ranges,) = dask.compute(apply.index_range(image, index))
        assert np.nanmin(ranges[..., 0]) == v[ok].min() and np.nanmax(ranges[..., 1]) == v[ok].max()
        (counts,) = dask.compute(apply.index_histogram(image, index, edges))
        np.testing.assert_array_equal(counts, np.histogram(v[ok], bins=edges)[0])
        (labels,) = dask.compute(apply.index_labels(image, index, 0.1, 255))
        np.testing.assert_array_equal(labels, np.where(ok, v > 0.1, 255).astype(np.uint8))


@pytest.mark.parametrize("dtype, nodata", [("uint8", 0.0), ("uint8", None), ("uint16", 65535.0), ("int16", -9999.0)])
def test_integer_band_fast_path_equals_the_float_index(dtype, nodata):
    """A bare 8/16-bit band is histogrammed with bincount and thresholded on integers; both
    must equal the float64 index path (np.histogram over unit bins, ``v > t``) on every pixel."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(7)
    img = rng.integers(info.min, info.max, size=(2, 70, 90), endpoint=True).astype(dtype)
    img[0, :3, :5] = [info.min, info.max, 1, 2, 3]
    if nodata is not None:
        img[0, 40:50, 10:30] = nodata
    names = ["a", "b"]
    v = img[0].astype(np.float64)
    ok = np.ones(v.shape, bool) if nodata is None else img[0] != nodata
    edges = integer_bin_edges(dtype)
    index = apply.IndexKernel(Expression.parse("a", names), names, nodata)
    assert index.integer_band(img) is not None
    image = da.from_array(img, chunks=(2, 32, 32))
    (counts,) = dask.compute(apply.index_histogram(image, index, edges))
    np.testing.assert_array_equal(counts, np.histogram(v[ok], bins=edges)[0])
    for t in (info.min - 3.0, float(info.min), 1.0, 1.5, 127.25, float(info.max) - 0.5, float(info.max), 1e9):
        (labels,) = dask.compute(apply.index_labels(image, index, t, 255))
        np.testing.assert_array_equal(labels, np.where(ok, v > t, 255).astype(np.uint8), err_msg=f"t={t}")
    # an index that is not a bare band, or a float band, takes the float path
    assert apply.IndexKernel(Expression.parse("a + 0", names), names, nodata).integer_band(img) is None
    assert index.integer_band(img.astype(np.float32)) is None


def test_threads_scheduler_runs_stages_in_this_process(tmp_path, scene):
    with dask_client(DaskConfig(scheduler="threads", n_workers=2, threads_per_worker=1)) as client:
        assert client is None
        assert dask.config.get("scheduler") == "threads" and dask.config.get("num_workers") == 2
        store = stages.ingest([scene["tif"]], tmp_path / "t.zarr", IngestConfig(chunk_size=256), progress=False)
    np.testing.assert_array_equal(xr.open_zarr(store)["image"].values, scene["image"])


def test_threads_scheduler_with_a_scheduler_address_is_refused():
    with pytest.raises(ConfigError, match="scheduler"):
        load_config(None, ["dask.scheduler=threads", "dask.scheduler_address=tcp://localhost:8786"])


def test_image_store_codec_and_all_fill_chunks(tmp_path):
    img = np.full((2, 130, 70), 5, np.uint16)
    img[:, :64, :64] = 0  # one whole chunk equal to the fill value (0)
    tif = synth.write_tif(tmp_path / "z.tif", img, names=["a", "b"])
    store = stages.ingest([tif], tmp_path / "z.zarr", IngestConfig(chunk_size=64), progress=False)
    arr = zarr.open_array(store / "image", mode="r")
    zstd = [c for c in arr.metadata.codecs if type(c).__name__ == "ZstdCodec"]
    assert zstd and zstd[0].level == zstore.IMAGE_ZSTD_LEVEL
    assert (store / "image" / "c" / "0" / "0" / "0").is_file()  # written, though all fill
    np.testing.assert_array_equal(arr[:], img)


def test_threshold_and_kmeans_read_only_the_bands_they_use(tmp_path, monkeypatch):
    """A threshold on some bands, or k-means on some bands, reads only those (the chunk tasks
    hold and pass on nothing else), with the labels of the whole-array computation."""
    from pipeline.config import KMeansConfig
    from pipeline.io import store as store_io

    img = _bimodal(np.uint8)
    img = np.concatenate([img, img[:1] // 2])  # bands A, B, C
    tif = synth.write_tif(tmp_path / "s.tif", img, nodata=0, names=["A", "B", "C"])
    store = stages.ingest([tif], tmp_path / "s.zarr", IngestConfig(chunk_size=128), progress=False)
    read: list = []
    real = store_io.read_region
    monkeypatch.setattr(store_io, "read_region", lambda s, bands, *w: read.append(list(bands)) or real(s, bands, *w))
    with dask_client(DaskConfig(progress=False, scheduler="threads")):
        stages.segment(store, SegmentConfig(method="threshold", threshold=ThresholdConfig(expression="(B - C) / B")),
                       progress=False)  # fmt: skip
        labels = xr.open_zarr(store)["labels"].values
        assert read and all(b == [1, 2] for b in read)
        v = img[1].astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):  # B = 0 is nodata
            ratio = (v - img[2]) / v
        t = float(zstore.open_store(store)["labels"].attrs["threshold"])
        expect = np.where(img[1:3].min(axis=0) == 0, LABEL_NODATA, ratio > t)
        np.testing.assert_array_equal(labels, expect)
        read.clear()
        stages.segment(store, SegmentConfig(method="kmeans", kmeans=KMeansConfig(n_clusters=2, bands=["C"])),
                       progress=False, overwrite=True)  # fmt: skip
        assert read and all(b == [2] for b in read)


def test_read_region_with_contiguous_and_scattered_bands(tmp_path, scene):
    store = stages.ingest([scene["tif"]], tmp_path / "r.zarr", IngestConfig(chunk_size=200), progress=False)
    ref = scene["image"]
    for bands in ([1, 2], [0, 2, 3], [3], [2, 1]):
        got = zstore.read_region(store, bands, 150, 420, 390, 777)
        np.testing.assert_array_equal(got, ref[bands, 150:420, 390:777])


def test_iter_blocks_reads_windows_and_names_a_damaged_chunk(tmp_path, scene):
    from rasterio.windows import Window

    store = stages.ingest([scene["tif"]], tmp_path / "b.zarr", IngestConfig(chunk_size=256), progress=False)
    wins = [Window(0, 0, 256, 256), Window(700, 500, 300, 277)]
    blocks = list(zstore.iter_blocks(store, "image", wins))
    np.testing.assert_array_equal(blocks[1][1], scene["image"][:, 500:777, 700:1000])
    (store / "image" / "c" / "0" / "0" / "0").write_bytes(b"not a zstd frame")
    with pytest.raises(RasterIOError, match=r"image\[0:256, 0:256\]"):
        list(zstore.iter_blocks(store, "image", wins))


def _max_live(dsk: dict, prefix: str) -> int:
    """Most outputs of keys named ``prefix*`` held at once when ``dsk`` runs one task at a
    time in ``dask.order``'s order (an output is freed after its last dependent ran)."""
    from dask.core import get_dependencies
    from dask.order import order

    deps = {k: get_dependencies(dsk, k) for k in dsk}
    waiting: dict = {}
    for k, ds in deps.items():
        for d in ds:
            waiting[d] = waiting.get(d, 0) + 1
    live: set = set()
    most = 0
    priority = order(dsk)
    for k in sorted(dsk, key=priority.get):
        for d in deps[k]:
            waiting[d] -= 1
            if waiting[d] == 0:
                live.discard(d)
        if isinstance(k, tuple) and str(k[0]).startswith(prefix):
            live.add(k)
        most = max(most, len(live))
    return most


def test_chunk_writes_are_ordered_by_rows_so_unet_window_blocks_are_freed_early():
    """On a 4096 px wide raster Dask's own order kept 30 window blocks' sums alive at once (a
    band of about 5 block rows); the row chain of ``apply.chunk_tasks`` keeps at most 2 to 3
    block rows (6 blocks each) and still writes every chunk once."""
    from pipeline import inference
    from pipeline.blend import WindowGrid

    image = da.zeros((10, 4096, 4096), np.uint16, chunks=(10, 512, 512))  # only its shape and chunks are used
    probs = inference.unet_probabilities("never-read.zarr", image, list(range(10)),
                                         WindowGrid.from_overlap(256, 0.25, 16, "edge"), "gaussian", "m.safetensors",
                                         "cpu", 8, None, 8)  # fmt: skip
    status = apply.write_chunks(apply.argmax_valid_labels(probs, 255), None, lambda *a: None)
    todo = [(i, j) for i in range(8) for j in range(8)]
    task = apply.chunk_tasks(status, todo)
    dsk = dict(task.__dask_graph__())
    writes = [k for k in dsk if isinstance(k, tuple) and k[0] == status.name]
    assert sorted(k[1:] for k in writes) == todo
    n_blocks = sum(1 for k in dsk if isinstance(k, tuple) and str(k[0]).startswith("tileseg-unet"))
    assert n_blocks == 66
    assert _max_live(dsk, "tileseg-unet") <= 18


def test_cog_compression_level_is_applied_and_checked(tmp_path):
    """``stitch.level`` reaches GDAL (a lower deflate level writes a larger file of the same
    pixels) and a level the codec does not take is refused."""
    from rasterio.windows import Window

    from pipeline.config import StitchConfig
    from pipeline.grid import Grid
    from pipeline.io.raster import write_cog

    labels = synth.class_map(512, 512, n_classes=8, seed=3).astype(np.uint8)
    labels[::7, ::5] = 3  # some texture, so that the levels differ
    grid = Grid(None, rasterio.Affine.identity(), 512, 512)
    sizes = {}
    for level in (1, 9):
        out = write_cog(tmp_path / f"l{level}.tif", grid, "uint8", 255, [(Window(0, 0, 512, 512), labels)],
                        blocksize=256, compress="deflate", level=level)  # fmt: skip
        with rasterio.open(out) as ds:
            np.testing.assert_array_equal(ds.read(1), labels)
        sizes[level] = out.stat().st_size
    assert sizes[1] > sizes[9]
    assert StitchConfig(compress="zstd", level=1).level == 1
    for bad in ({"compress": "lzw", "level": 3}, {"compress": "deflate", "level": 15}):
        with pytest.raises(ValueError, match="does not fit compress"):
            StitchConfig(**bad)


def test_unet_in_strips_keeps_the_window_blocks_alive_bounded_by_the_strip_not_the_width():
    """Row by row, the window blocks alive grow with the raster's width (a row of blocks);
    computed in vertical strips (``strip_px``, each strip with its own copies of the border
    blocks), they stay at what one strip needs, for any width, and every chunk is written once."""
    from pipeline import inference
    from pipeline.blend import WindowGrid
    from pipeline.grid import column_strips

    def live_blocks(width: int, strip_px: int | None) -> int:
        image = da.zeros((10, 3072, width), np.uint16, chunks=(10, 512, 512))
        probs = inference.unet_probabilities("never-read.zarr", image, list(range(10)),
                                             WindowGrid.from_overlap(256, 0.25, 16, "edge"), "gaussian",
                                             "m.safetensors", "cpu", 8, None, 8, strip_px=strip_px)  # fmt: skip
        status = apply.write_chunks(apply.argmax_valid_labels(probs, 255), None, lambda *a: None)
        todo = [(i, j) for i in range(status.numblocks[0]) for j in range(status.numblocks[1])]
        dsk = dict(apply.chunk_tasks(status, todo, column_strips(image.chunks[-1], strip_px)).__dask_graph__())
        assert sorted(k[1:] for k in dsk if isinstance(k, tuple) and k[0] == status.name) == todo
        return _max_live(dsk, "tileseg-unet")

    rows = [live_blocks(w, None) for w in (8192, 16384)]
    strips = [live_blocks(w, 4096) for w in (8192, 16384)]
    assert rows[1] > 1.8 * rows[0]  # a row of blocks: twice as wide, twice as many
    assert max(strips) <= 20 < rows[0]  # one strip's worth (4096 px) at either width


def test_instance_unet_chunks_finish_row_by_row_and_strip_by_strip():
    """The instance U-Net (watershed on the blended probabilities): computed as the stage
    does (chunk tasks write their ranks; counts and pairs gathered through the row chain,
    ``instances.ordered_counts_pairs``), the window blocks and chunk tasks alive stay the same
    for a taller raster (rows) and for a wider one (strips). Computing the counts and pairs
    as outputs of their own let Dask's order keep every chunk's task alive (48 of 48 at
    3072 x 4096 px, and 48 window blocks against 12 to 14)."""
    from pipeline import inference
    from pipeline.blend import WindowGrid
    from pipeline.grid import column_strips
    from pipeline.instances import ordered_counts_pairs, segment_chunks
    from pipeline.segment.instance_unet import watershed_kernel

    def live(height: int, width: int, strip_px: int | None) -> tuple[int, int]:
        image = da.zeros((3, height, width), np.uint16, chunks=(3, 512, 512))  # only its shape and chunks are used
        probs = inference.unet_probabilities("never-read.zarr", image, [0, 1, 2],
                                             WindowGrid.from_overlap(256, 0.25, 16, "edge"), "hann", "m.safetensors",
                                             "cpu", 8, None, 3, strip_px=strip_px)[:-1]  # fmt: skip
        valid = da.ones((height, width), bool, chunks=(512, 512))
        chunked = segment_chunks(probs, valid, watershed_kernel(required_halo=30), 30,
                                 writer=zstore.WindowWriter("never-written.zarr"))  # fmt: skip
        dsk = dict(ordered_counts_pairs(chunked, column_strips(image.chunks[-1], strip_px)).__dask_graph__())
        segs = sorted(k[1:] for k in dsk if isinstance(k, tuple) and str(k[0]).startswith("instances-seg"))
        assert segs == [(i, j) for i in range(height // 512) for j in range(width // 512)]  # each chunk once
        return _max_live(dsk, "tileseg-unet"), _max_live(dsk, "instances-seg")

    # dask.order breaks ties by key names (tokens differ between processes): 12 to 14 blocks, 6 to 8 chunks
    rows = [live(h, 4096, None) for h in (3072, 6144)]
    assert all(blocks <= 16 and chunks <= 10 for blocks, chunks in rows)  # rows: the height does not matter
    strips = [live(3072, w, 4096) for w in (8192, 16384)]
    assert all(blocks <= 24 and chunks <= 10 for blocks, chunks in strips)  # strips: nor does the width


def test_gdal_block_cache_is_sized_in_bytes(tmp_path, scene):
    """rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64 in bytes: a bare 64 was a
    64-byte cache, which stayed after the first ingest and made a JPEG2000 band read onto a
    finer grid 40 times slower. The cache tileseg sets for reads and COG writes is 16 MiB."""
    from rasterio._env import get_gdal_config

    from pipeline.io import raster as rio_io

    for env in (rio_io._READ_ENV, rio_io._WRITE_ENV):
        with rasterio.Env(**env):
            assert get_gdal_config("GDAL_CACHEMAX") == 16 * 1024 * 1024
    with dask_client(DaskConfig(progress=False, scheduler="threads")):
        stages.ingest([scene["tif"]], tmp_path / "c.zarr", IngestConfig(chunk_size=256), progress=False)
    assert get_gdal_config("GDAL_CACHEMAX") >= 16 * 1024 * 1024  # whatever is left for the process
