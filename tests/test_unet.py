"""U-Net inference through the segment stage: chunking invariance, nodata, checkpoints."""

import dask
import numpy as np
import pytest
import torch
import xarray as xr

from pipeline import stages
from pipeline.config import LABEL_NODATA, IngestConfig, SegmentConfig, UNetConfig
from pipeline.errors import InputError
from pipeline.segment.unet import build_model, load_model, save_model
from tests import synth
from tests.models import BANDS, tiny_spec, tiny_unet

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_unet(tmp_path_factory.mktemp("model") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="module")
def odd_scene(tmp_path_factory):
    """700 x 530 px (x, y), 4 bands, nodata collar of 5 px."""
    d = tmp_path_factory.mktemp("odd")
    classes = synth.class_map(530, 700, n_classes=3, seed=4)
    img = synth.bands_from_classes(classes, n_bands=4, seed=5, nodata_collar=5)
    return synth.write_tif(d / "odd.tif", img, nodata=0, names=BANDS), img


def _segment(tif, tmp, chunk, model, **unet):
    store = stages.ingest([tif], tmp / f"c{chunk}.zarr", IngestConfig(chunk_size=chunk), progress=False)
    cfg = SegmentConfig(method="unet", unet=UNetConfig(model=model, window=64, overlap=0.25, batch_size=4,
                                                       device="cpu", probabilities=True, **unet))  # fmt: skip
    stages.segment(store, cfg, progress=False)
    return xr.open_zarr(store)


def test_unet_result_does_not_depend_on_chunking(odd_scene, tiny_model, tmp_path):
    tif, img = odd_scene
    ref = _segment(tif, tmp_path, 1024, tiny_model)  # one single piece
    ref_p = ref["probabilities"].values.astype(np.float32)
    ref_l = ref["labels"].values
    assert ref["probabilities"].dtype == np.float16
    assert len(np.unique(ref_l[5:, 5:])) >= 2
    for chunk in (96, 200, 512):
        ds = _segment(tif, tmp_path, chunk, tiny_model)
        assert ds["labels"].chunks == ((chunk,) * (530 // chunk) + ((530 % chunk,) if 530 % chunk else ()),
                                       (chunk,) * (700 // chunk) + ((700 % chunk,) if 700 % chunk else ()))
        np.testing.assert_array_equal(ds["labels"].values, ref_l, err_msg=f"chunk {chunk}")
        np.testing.assert_array_equal(ds["probabilities"].values.astype(np.float32), ref_p)  # integer sums
    # in vertical strips of 256 px (4 strips of 2 chunks, one after the other): the same result
    (tmp_path / "strips").mkdir()
    ds = _segment(tif, tmp_path / "strips", 96, tiny_model, strip_px=256)
    np.testing.assert_array_equal(ds["labels"].values, ref_l, err_msg="strips")
    np.testing.assert_array_equal(ds["probabilities"].values.astype(np.float32), ref_p)


def test_unet_float32_probabilities_match_single_piece_in_memory(odd_scene, tiny_model, tmp_path):
    """The stage's chunked run equals blend_region on the whole in-memory raster (float32, < 1e-5)."""
    from pipeline.blend import WindowGrid, blend_region, window_weights
    from pipeline.segment.unet import normalise, predict_probabilities

    tif, img = odd_scene
    ds = _segment(tif, tmp_path, 128, tiny_model, blend="gaussian")
    net, spec = load_model(tiny_model)
    g = WindowGrid.from_overlap(64, 0.25, spec.divisor)

    def predict(b):
        return predict_probabilities(net, normalise(b, spec, ~(b == 0).all(axis=1)), "cpu")

    whole = blend_region(lambda a, b, c, d: img[:, a:b, c:d], img.shape[1:], (0, 530), (0, 700), g,
                         window_weights(64, "gaussian"), predict, 3, 4).astype(np.float32)  # fmt: skip
    valid = (img != 0).any(axis=0)
    labels = np.where(valid, whole.argmax(axis=0), 255)
    np.testing.assert_array_equal(ds["labels"].values, labels)
    assert np.abs(ds["probabilities"].values.astype(np.float32) - whole).max() < 1e-3  # float16 storage


def test_nodata_where_all_bands_are_nodata(odd_scene, tiny_model, tmp_path):
    tif, img = odd_scene
    lab = _segment(tif, tmp_path, 256, tiny_model)["labels"].values
    assert (lab[:5] == 255).all() and (lab[:, :5] == 255).all()
    assert (lab[5:, 5:] != 255).all()


@pytest.mark.parametrize("declared", [float("nan"), None])
def test_nan_pixels_are_nodata_and_do_not_spoil_their_neighbours(odd_scene, tiny_model, tmp_path, declared):
    """A float32 raster with NaN nodata (declared or not): NaN reached the model, its
    pixels came out as class 0 and the NaN spread to the labels of valid pixels around."""
    tif, img = odd_scene
    zeros = img.astype(np.float32)
    zeros[:, 200:240, 300:340] = 0  # the uint16 scene's nodata: the reference
    nans = img.astype(np.float32)
    nans[nans == 0] = np.nan
    nans[:, 200:240, 300:340] = np.nan
    nans[1, 100:110, 100:110] = np.nan  # one band of valid pixels: taken as that band's mean
    zeros[1, 100:110, 100:110] = tiny_spec().mean[1]
    ref_tif = synth.write_tif(tmp_path / "zeros.tif", zeros, nodata=0, names=BANDS)
    nan_tif = synth.write_tif(tmp_path / "nans.tif", nans, nodata=declared, names=BANDS)
    ref = _segment(ref_tif, tmp_path / "ref", 256, tiny_model)
    got = _segment(nan_tif, tmp_path / "nan", 256, tiny_model)
    assert (got["labels"].values[200:240, 300:340] == 255).all()
    np.testing.assert_array_equal(got["labels"].values, ref["labels"].values)
    assert np.isfinite(got["probabilities"].values).all()


def test_a_band_missing_at_a_valid_pixel_is_its_band_mean(odd_scene, tiny_model, tmp_path):
    """One band's nodata value (-9999) at pixels whose other bands are valid reached the
    model as a number and swayed the neighbours' classes; like NaN or inf there, it is now
    that band's mean. Pixels where every band is missing stay nodata (255)."""
    tif, img = odd_scene
    block = np.s_[1, 200:260, 150:230]
    ref, bad, inf = (img.astype(np.float32) for _ in range(3))
    ref[block] = tiny_spec().mean[1]
    bad[block] = -9999
    inf[block] = np.inf
    for a in (ref, bad, inf):
        a[a == 0] = -9999  # the collar, all bands missing
    runs = {name: _segment(synth.write_tif(tmp_path / f"{name}.tif", a, nodata=-9999, names=BANDS),
                           tmp_path / name, 256, tiny_model)["labels"].values
            for name, a in (("ref", ref), ("bad", bad), ("inf", inf))}  # fmt: skip
    np.testing.assert_array_equal(runs["bad"], runs["ref"])
    np.testing.assert_array_equal(runs["inf"], runs["ref"])
    assert (runs["ref"][:5] == 255).all() and (runs["ref"][200:260, 150:230] != 255).all()


def test_checkpoint_with_other_bands_is_refused(odd_scene, tmp_path):
    tif, _ = odd_scene
    spec = tiny_spec(bands=["B02", "B03", "B11", "B12"])
    path = save_model(build_model(spec), spec, tmp_path / "other.safetensors")
    with pytest.raises(InputError, match=r"\['B11', 'B12'\]"):
        _segment(tif, tmp_path, 256, path)


def test_pickle_checkpoint_is_refused_never_executed(tmp_path):
    spec = tiny_spec()
    path = save_model(build_model(spec), spec, tmp_path / "m.safetensors")

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"x": Boom()}, path)  # a pickle where the weights should be
    with pytest.raises(InputError, match="not a safetensors file"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()


def test_fcn_baseline_runs_through_the_same_path(odd_scene, tmp_path):
    tif, _ = odd_scene
    spec = tiny_spec(arch="fcn_resnet50")
    path = save_model(build_model(spec), spec, tmp_path / "fcn.safetensors")
    lab = _segment(tif, tmp_path, 512, path)["labels"].values
    assert lab.shape == (530, 700) and set(np.unique(lab[5:, 5:])) <= {0, 1, 2}


def test_constant_model_stitches_to_a_constant_cog(odd_scene, tmp_path):
    """A model whose logits ignore the input gives one class everywhere, up to the raster edges,
    through segment and stitch."""
    import rasterio

    from pipeline.config import StitchConfig

    tif, _ = odd_scene
    spec = tiny_spec()
    net = build_model(spec)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.segmentation_head[0].bias.copy_(torch.tensor([0.1, 0.7, 0.2]))
    path = save_model(net, spec, tmp_path / "const.safetensors")
    ds = _segment(tif, tmp_path, 200, path)
    probs = ds["probabilities"].values.astype(np.float32)
    expected = torch.softmax(torch.tensor([0.1, 0.7, 0.2]), 0).numpy()
    assert np.abs(probs - expected[:, None, None]).max() < 1e-3  # float16 storage, every pixel incl. edges
    cog = stages.stitch(tmp_path / "c200.zarr", tmp_path / "const.tif", StitchConfig(), progress=False)
    with rasterio.open(cog) as src:
        lab = src.read(1)
    assert (lab[5:, 5:] == 1).all()  # class 1 has the largest logit, up to the last row and column
    assert (lab[:5] == 255).all()  # the nodata collar stays nodata


@pytest.mark.parametrize("placement", ["centred", "edge"])
def test_each_window_runs_once_and_any_chunking_gives_identical_sums(odd_scene, tiny_model, tmp_path,
                                                                     monkeypatch, placement):  # fmt: skip
    """Windows run in blocks of one batch, whose sums spill into the chunks they cover
    (pipeline.inference): the model sees every window of the grid exactly once, in full
    batches except at the raster's edges, for any chunking, also with chunks narrower than a
    window, and the float32 probabilities are bit-identical to blend_region on the whole
    in-memory raster. In vertical strips (``strip_px``) the blocks on strip borders run once
    per strip, with the same result."""
    import dask

    from pipeline import inference
    from pipeline.blend import WindowGrid, blend_region, window_weights
    from pipeline.io import store as zstore
    from pipeline.segment.unet import normalise, predict_probabilities

    tif, img = odd_scene
    net, spec = load_model(tiny_model)
    g = WindowGrid.from_overlap(64, 0.25, spec.divisor, placement)
    seen: list[tuple[int, int]] = []
    real = inference.window_sums

    def counting(read, shape, oy, ox, *args):
        assert len(oy) * len(ox) == 4 or (oy[-1] == g.origins(530)[-1] or ox[-1] == g.origins(700)[-1])  # 1 batch
        seen.extend((int(y), int(x)) for y in oy for x in ox)
        return real(read, shape, oy, ox, *args)

    monkeypatch.setattr(inference, "window_sums", counting)

    def predict(b):
        return predict_probabilities(net, normalise(b, spec, ~(b == 0).all(axis=1)), "cpu")

    whole = blend_region(lambda a, b, c, d: img[:, a:b, c:d], img.shape[1:], (0, 530), (0, 700), g,
                         window_weights(64, "gaussian"), predict, 3, 4).astype(np.float32)  # fmt: skip
    grid_windows = {(int(y), int(x)) for y in g.origins(530) for x in g.origins(700)}
    stores = {}
    for chunk, strip_px in ((40, None), (128, None), (1024, None), (40, 200), (128, 256)):
        if chunk not in stores:
            stores[chunk] = stages.ingest([tif], tmp_path / f"w{chunk}.zarr", IngestConfig(chunk_size=chunk),
                                          progress=False)  # fmt: skip
        image = zstore.open_store(stores[chunk])["image"].data
        seen.clear()
        probs = inference.unet_probabilities(str(stores[chunk]), image, [0, 1, 2, 3], g, "gaussian", str(tiny_model),
                                             "cpu", 4, 0, 3, strip_px=strip_px)  # fmt: skip
        with dask.config.set(scheduler="sync"):
            out = probs.compute()
        case = f"chunk {chunk}, strips of {strip_px} px"
        assert set(seen) == grid_windows, case
        if strip_px is None:
            assert len(seen) == len(grid_windows), case  # every window once
        else:
            assert len(seen) > len(grid_windows), case  # the blocks on strip borders run once per strip
        np.testing.assert_array_equal(out[:-1], whole, err_msg=case)
        np.testing.assert_array_equal(out[-1], (img != 0).any(axis=0))  # the validity channel


def test_edge_placement_and_gaussian_weights_are_monai_s():
    """``placement: edge`` puts windows where MONAI's sliding_window_inference does, and the
    gaussian weights equal MONAI's importance map (float32 cast)."""
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from pipeline.blend import WindowGrid, window_weights

    for window, overlap in [(64, 0.25), (256, 0.25), (96, 0.5), (100, 0.3)]:
        g = WindowGrid.from_overlap(window, overlap, placement="edge")
        for size in (window + 1, 2 * window - 3, 530, 1000, 4097):
            interval = _get_scan_interval((size, size), (window, window), 2, (overlap, overlap))
            starts = sorted({s[0].start for s in dense_patch_slices((size, size), (window, window), interval)})
            assert g.origins(size).tolist() == starts, (window, overlap, size)
        monai_w = compute_importance_map((window, window), mode="gaussian", sigma_scale=0.125).numpy()
        np.testing.assert_allclose(window_weights(window, "gaussian"), monai_w, rtol=2e-6, atol=0)


def test_compiled_model_gives_the_same_probabilities(odd_scene, tiny_model, tmp_path):
    """``segment.unet.compile``: torch.compile (TorchInductor's C++ kernels on the CPU), model
    calls one at a time on every core (``inference._MODEL_LOCK``) on Dask's threaded scheduler,
    2 threads: probabilities within 1e-3 of the eager model's (float16 storage), labels equal
    but where the two best classes are that close."""
    from pipeline.cluster import dask_client
    from pipeline.config import DaskConfig

    from torch._dynamo.utils import counters

    tif, _ = odd_scene
    with dask_client(DaskConfig(progress=False, scheduler="threads")):
        (tmp_path / "e").mkdir()
        (tmp_path / "c").mkdir()
        eager = _segment(tif, tmp_path / "e", 200, tiny_model)
        frames = counters["frames"]["ok"]
        compiled = _segment(tif, tmp_path / "c", 200, tiny_model, compile=True)
    assert counters["frames"]["ok"] > frames  # Dynamo compiled the model's forward
    valid = eager["labels"].values != LABEL_NODATA  # in the nodata collar the windows' weights are near 0
    np.testing.assert_array_equal(compiled["labels"].values != LABEL_NODATA, valid)
    p_e = eager["probabilities"].values.astype(np.float32)[:, valid]
    p_c = compiled["probabilities"].values.astype(np.float32)[:, valid]
    np.testing.assert_allclose(p_c, p_e, atol=1e-3)
    top2 = np.sort(p_e, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 2e-3
    np.testing.assert_array_equal(compiled["labels"].values[valid][clear], eager["labels"].values[valid][clear])
    assert clear.mean() > 0.99


def test_a_model_that_cannot_compile_is_a_one_line_config_error(odd_scene, tmp_path, monkeypatch):
    """No working C++ compiler: the segment stage stops with one line naming the option."""
    import torch._inductor.config as inductor

    from pipeline.errors import ConfigError

    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-c++-compiler",))
    monkeypatch.setattr(inductor, "force_disable_caches", True)  # no kernels from an earlier compile
    # another architecture: no kernel source of an earlier compile in this process matches
    model = tiny_unet(tmp_path / "fresh.safetensors", seed=7, decoder_channels=[12, 6])
    # torch's config changes hold in the thread that makes them: run the tasks in this one
    with dask.config.set(scheduler="sync"), pytest.raises(ConfigError, match=r"torch.compile failed on cpu "
                                                          r"\(.*C\+\+ compiler.*\); set compile: false") as err:
        _segment(odd_scene[0], tmp_path, 256, model, compile=True)
    assert "\n" not in str(err.value)


def test_normalising_on_the_device_equals_normalise_and_leaves_the_batch_alone(tiny_model):
    """``predict_probabilities(spec=..., valid=...)`` (normalised in torch, on the device)
    gives the same probabilities, bit for bit, as the numpy ``normalise`` first, for uint16
    and float32 batches, and never writes into the caller's array."""
    from pipeline.segment.unet import load_model, normalise, predict_probabilities

    net, spec = load_model(tiny_model, "cpu")
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 5000, (3, 4, 64, 64)).astype(np.uint16)
    raw[1, :, :10, :20] = 0
    valid = ~(raw == 0).all(axis=1)
    ref = predict_probabilities(net, normalise(raw, spec, valid), "cpu")
    for batch in (raw, raw.astype(np.float32)):
        before = batch.copy()
        np.testing.assert_array_equal(predict_probabilities(net, batch, "cpu", spec=spec, valid=valid), ref)
        np.testing.assert_array_equal(batch, before)
    one_band = raw[:, :1].astype(np.float32)  # NCHW and channels_last share memory when C == 1
    spec1 = spec.model_copy(update={"bands": spec.bands[:1], "mean": spec.mean[:1], "std": spec.std[:1]})
    before = one_band.copy()
    predict_probabilities(torch.nn.Identity(), one_band, "cpu", spec=spec1, valid=valid)
    np.testing.assert_array_equal(one_band, before)
