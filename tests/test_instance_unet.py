"""Instance U-Net: 3-class targets, the watershed kernel, training through stages.train, checkpoints."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline import stages
from pipeline.config import BBox, GroundTruthConfig, IngestConfig, TrainConfig
from pipeline.errors import InputError
from pipeline.segment.instance_unet import (
    INSTANCE_CLASSES,
    WatershedParams,
    boundary_targets,
    watershed_instances,
    watershed_kernel,
)
from pipeline.segment.unet import ModelSpec, build_model, load_model, load_spec, save_model
from tests import synth
from tests.synth_instances import blob_image, blob_instances, two_touching_discs


def test_targets_of_a_hand_made_mask():
    ids = np.zeros((7, 10), dtype=np.int32)
    ids[1:6, 1:4] = 1  # 5 x 3 object ...
    ids[1:6, 4:8] = 2  # ... touching a 5 x 4 object along a column
    ids[0, 9] = 3  # a 1 px object
    t = boundary_targets(ids)
    assert t.dtype == np.int64 and t.shape == ids.shape
    np.testing.assert_array_equal(t > 0, ids > 0)  # interior + boundary is exactly the objects
    # inner outline: every object pixel with a 4-neighbour of another value
    np.testing.assert_array_equal(t[3], [0, 2, 1, 2, 2, 1, 1, 2, 0, 0])  # both sides of the contact are boundary
    np.testing.assert_array_equal(t[1, 1:8], [2] * 7)  # top rows of both objects
    assert t[0, 9] == 2  # too thin for an interior
    assert t[2, 2] == 1 and t[2, 5] == 1 and t[2, 6] == 1
    # the touching objects' interiors are apart: one interior component each
    _, n = ndimage.label(t == 1)
    assert n == 2


def test_targets_mark_unlabeled_pixels_and_do_not_outline_against_them():
    ids = np.zeros((6, 6), dtype=np.int64)
    ids[1:5, 1:5] = 7
    unl = np.zeros(ids.shape, bool)
    unl[:, 5] = True  # a column of no-label next to the object
    t = boundary_targets(ids, unl)
    assert (t[:, 5] == 255).all()
    assert t[2, 2] == 1 and t[2, 4] == 2 and t[0, 0] == 0
    with pytest.raises(InputError, match="integer"):
        boundary_targets(ids.astype(float))


def _probabilities(ids: np.ndarray, erode: int = 2, sigma: float = 1.0) -> np.ndarray:
    """(3, y, x) smooth probabilities from ground truth: interior = each object eroded by
    ``erode`` px, boundary = the rest of the objects, background elsewhere."""
    interior = np.zeros(ids.shape, bool)
    for k in np.unique(ids[ids > 0]):
        interior |= ndimage.binary_erosion(ids == k, iterations=erode)
    fg = ids > 0
    onehot = np.stack([~fg, interior, fg & ~interior]).astype(np.float64)
    p = np.stack([ndimage.gaussian_filter(c, sigma) for c in onehot])
    return (p / p.sum(axis=0)).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_watershed_separates_two_touching_discs():
    ids = two_touching_discs(48)
    probs = _probabilities(ids)
    valid = np.ones(ids.shape, bool)
    fg = probs[1] + probs[2] > 0.5
    assert ndimage.label(fg)[1] == 1  # thresholding alone sees one object
    lab = watershed_instances(probs, valid)
    assert lab.dtype == np.int64 and lab.shape == ids.shape
    objs = [k for k in np.unique(lab) if k]
    assert len(objs) == 2
    for k in (1, 2):  # each disc is matched by one predicted object
        assert max(_iou(ids == k, lab == j) for j in objs) > 0.85


def test_watershed_leaves_nodata_background_and_keeps_seedless_thin_objects():
    ids = two_touching_discs(48)
    ids[2:4, 2:20] = 9  # a 2 px thick bar: no interior pixel at all
    probs = _probabilities(ids, erode=2)
    valid = np.ones(ids.shape, bool)
    valid[:, 40:] = False
    lab = watershed_kernel(WatershedParams(min_size_px=8))(probs, valid)
    assert (lab[:, 40:] == 0).all()
    bar = lab[2:4, 4:18]
    assert (bar > 0).all() and len(np.unique(bar)) == 1  # the bar is one object of its own
    assert bar[0, 0] not in set(np.unique(lab[10:40, 10:38]))


def test_watershed_is_local_to_foreground_components():
    """An object wholly inside a crop gets the same pixels whether the kernel sees the crop
    or the whole field (the kernel's locality, which the chunk stitcher relies on)."""
    ids = blob_instances(120, 120, n=40, seed=3)
    probs = _probabilities(ids)
    full = watershed_instances(probs, np.ones(ids.shape, bool))
    r0, c0, r1, c1 = 17, 23, 97, 110
    part = watershed_instances(probs[:, r0:r1, c0:c1], np.ones((r1 - r0, c1 - c0), bool))
    # foreground components of the crop that do not touch its edge are whole in both runs
    comps, n = ndimage.label(part > 0)
    edge = set(np.unique(np.concatenate([comps[0], comps[-1], comps[:, 0], comps[:, -1]])))
    checked = 0
    for k in np.unique(part[part > 0]):
        m = part == k
        if set(np.unique(comps[m])) & edge:
            continue
        other = np.unique(full[r0:r1, c0:c1][m])
        assert len(other) == 1 and other[0] > 0
        np.testing.assert_array_equal(full[r0:r1, c0:c1] == other[0], m)
        checked += 1
    assert checked >= 5


def test_watershed_kernel_through_the_chunk_stitcher_equals_one_piece():
    """The kernel plugged into pipeline.instances: chunked labels equal the single-piece run
    (same partition) for several chunkings, with a halo larger than any cluster of discs."""
    from pipeline.instances import chunking_agreement

    ids = blob_instances(150, 130, n=30, seed=7)
    probs = _probabilities(ids)
    valid = np.ones(ids.shape, bool)
    valid[:, :4] = False
    clusters, n = ndimage.label(probs[1] + probs[2] > 0.5)
    extent = max(max(s.stop - s.start for s in sl) for sl in ndimage.find_objects(clusters))
    kernel = watershed_kernel(required_halo=extent)
    for a in chunking_agreement(probs, valid, kernel, halo=extent, chunk_sizes=[40, 64, 97]):
        assert a.ari == 1.0 and a.n_objects == a.n_reference == a.matched, a
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="halo"):
        chunking_agreement(probs, valid, kernel, halo=extent - 1, chunk_sizes=[64])


def _tiny_spec(**kw) -> ModelSpec:
    base = dict(arch="Unet", encoder="resnet18", encoder_depth=2, decoder_channels=[16, 8], bands=["DAPI"],
                mean=[700.0], std=[400.0], classes=INSTANCE_CLASSES, tile_size=64,
                target="instance_boundary")  # fmt: skip
    base.update(kw)
    return ModelSpec(**base)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    spec = _tiny_spec()
    net = build_model(spec).eval()
    path = save_model(net, spec, tmp_path / "inst.safetensors")
    loaded, spec2 = load_model(path)
    assert spec2.save_id and spec2.model_copy(update={"save_id": None}) == spec and spec2.target == "instance_boundary"
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        np.testing.assert_array_equal(net(x).numpy(), loaded(x).numpy())


@pytest.fixture(scope="module")
def blob_scene(tmp_path_factory):
    """A 160 x 128 px (y, x) one-band image of touching discs and its instance-id raster."""
    d = tmp_path_factory.mktemp("blobs")
    ids = blob_instances(160, 128, n=60, seed=1)
    tif = synth.write_tif(d / "img.tif", blob_image(ids, seed=2), names=["DAPI"])
    gt = synth.write_tif(d / "ids.tif", ids.astype(np.uint16))
    store = stages.ingest([tif], d / "s.zarr", IngestConfig(chunk_size=64), progress=False)
    return store, gt, ids, tif


@pytest.fixture(scope="module")
def trained(blob_scene, tmp_path_factory):
    """A tiny instance-boundary U-Net trained by stages.train on the blob scene."""
    store, gt, _, _ = blob_scene
    x0, y1 = synth.ORIGIN  # 10 m pixels: rows 0-95 train, rows 96-159 validate
    cfg = TrainConfig(
        arch="Unet", encoder="resnet18", encoder_depth=2, decoder_channels=[16, 8], target="instance_boundary",
        train_area=BBox(xmin=x0, ymin=y1 - 960, xmax=x0 + 1280, ymax=y1),
        val_area=BBox(xmin=x0, ymin=y1 - 1600, xmax=x0 + 1280, ymax=y1 - 960),
        tile=64, stride=32, epochs=12, patience=20, batch_size=4, lr=3e-3, seed=0, device="cpu",
        out=tmp_path_factory.mktemp("inst") / "inst.safetensors",
    )  # fmt: skip
    return stages.train(store, cfg, GroundTruthConfig(path=gt), [], progress=False)


def test_training_with_instance_boundary_target_lowers_the_loss(trained):
    path = trained
    log = [json.loads(line) for line in path.with_suffix(".log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"], [e["train_loss"] for e in log]
    spec = load_spec(path)
    assert spec.classes == INSTANCE_CLASSES and spec.target == "instance_boundary"
    assert spec.trained["train_chips"] == 6
    net, _ = load_model(path)
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_instance_boundary_refit_trains_on_boundary_targets(blob_scene, tmp_path):
    """The refit reads the validation area with the same target as the first fit (it read
    raw instance ids, and the loss failed with 'Target 32 is out of bounds')."""
    store, gt, _, _ = blob_scene
    x0, y1 = synth.ORIGIN
    cfg = TrainConfig(
        arch="Unet", encoder="resnet18", encoder_depth=2, decoder_channels=[16, 8], target="instance_boundary",
        train_area=BBox(xmin=x0, ymin=y1 - 960, xmax=x0 + 1280, ymax=y1),
        val_area=BBox(xmin=x0, ymin=y1 - 1600, xmax=x0 + 1280, ymax=y1 - 960),
        tile=64, stride=32, epochs=1, patience=5, batch_size=4, seed=0, device="cpu", refit=True,
        out=tmp_path / "refit.safetensors",
    )  # fmt: skip
    path = stages.train(store, cfg, GroundTruthConfig(path=gt), [], progress=False)
    assert load_spec(path).trained["refit_epochs"] == 1


def test_instance_training_refuses_vector_ground_truth(blob_scene, tmp_path):
    store, _, _, _ = blob_scene
    x0, y1 = synth.ORIGIN
    cfg = TrainConfig(target="instance_boundary", train_area=BBox(xmin=x0, ymin=y1 - 960, xmax=x0 + 1280, ymax=y1),
                      val_area=BBox(xmin=x0, ymin=y1 - 1600, xmax=x0 + 1280, ymax=y1 - 960),
                      out=tmp_path / "m")  # fmt: skip
    vec = tmp_path / "gt.geojson"
    vec.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(InputError, match="raster of instance ids"):
        stages.train(store, cfg, GroundTruthConfig(path=vec, class_column="c"), [], progress=False)


def test_instances_stage_with_the_unet_watershed_does_not_depend_on_chunking(blob_scene, trained, tmp_path):
    """`instances.method: unet_watershed` through instance_stages.segment_instances: the same
    objects (same partition of the pixels) for several chunk sizes and one single piece."""
    import xarray as xr
    from sklearn.metrics import adjusted_rand_score

    from pipeline import instance_stages
    from pipeline.config import InstanceConfig, LearnedInstanceConfig

    _, _, ids, tif = blob_scene
    cfg = InstanceConfig(method="unet_watershed", max_diameter=30,
                         learned=LearnedInstanceConfig(model=trained, window=64, batch_size=4, device="cpu"))  # fmt: skip
    out = {}
    for chunk in (48, 64, 256):
        store = stages.ingest([tif], tmp_path / f"c{chunk}.zarr", IngestConfig(chunk_size=chunk), progress=False)
        instance_stages.segment_instances(store, cfg, progress=False)
        da = xr.open_zarr(store)["instances"]
        assert da.attrs["method"] == "unet_watershed" and da.attrs["halo_px"] == 30
        out[chunk] = da.values
    ref = out[256]
    assert len(np.unique(ref)) > 10  # objects were found
    for chunk in (48, 64):
        assert adjusted_rand_score(ref.ravel(), out[chunk].ravel()) == 1.0
    # and they are objects, not noise: after 12 epochs on 6 chips, a fair share of the (often
    # heavily overlapping) discs is matched at IoU > 0.5 (an untrained model matches none)
    g, p = ids.ravel(), ref.ravel().astype(np.int64)
    matched = 0
    for k in np.unique(g[g > 0]):
        cand = np.bincount(p[g == k])
        cand[0] = 0
        j = int(cand.argmax())
        if j and cand[j] / ((g == k).sum() + (p == j).sum() - cand[j]) > 0.5:
            matched += 1
    assert matched >= 10, matched


def test_instances_stage_in_strips_gives_the_same_objects(trained, tmp_path):
    """``instances.learned.strip_px``: a raster wider than it is segmented strip after strip
    (each strip with its own copies of the window blocks on its borders, objects merged
    across the strip borders like any chunk border): the same ids, pixel for pixel."""
    import xarray as xr

    from pipeline import instance_stages
    from pipeline.config import InstanceConfig, LearnedInstanceConfig

    ids = blob_instances(128, 704, n=200, seed=4)
    tif = synth.write_tif(tmp_path / "wide.tif", blob_image(ids, seed=5), names=["DAPI"])
    store = stages.ingest([tif], tmp_path / "w.zarr", IngestConfig(chunk_size=64), progress=False)
    out = {}
    for strip_px in (None, 256):  # 11 chunk columns: one strip, or strips of 4, 4 and 3
        learned = LearnedInstanceConfig(model=trained, window=64, batch_size=4, device="cpu", strip_px=strip_px)
        instance_stages.segment_instances(store, InstanceConfig(method="unet_watershed", max_diameter=30,
                                                                learned=learned), progress=False)  # fmt: skip
        out[strip_px] = xr.open_zarr(store)["instances"].values
    assert len(np.unique(out[None])) > 20  # objects were found, also on the strip borders (x = 256, 512)
    assert (out[None][:, 250:262] > 0).any() and (out[None][:, 506:518] > 0).any()
    np.testing.assert_array_equal(out[256], out[None])


def test_instances_stage_refuses_a_semantic_model_for_the_watershed(blob_scene, tmp_path):
    from pipeline import instance_stages
    from pipeline.config import InstanceConfig, LearnedInstanceConfig

    store = blob_scene[0]
    spec = _tiny_spec(target="semantic", classes=["a", "b", "c"])
    path = save_model(build_model(spec), spec, tmp_path / "sem.safetensors")
    cfg = InstanceConfig(method="unet_watershed", learned=LearnedInstanceConfig(model=path, window=64, device="cpu"))
    with pytest.raises(InputError, match="not an instance-boundary U-Net"):
        instance_stages.segment_instances(store, cfg, progress=False)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="learned.model"):
        InstanceConfig(method="maskrcnn")
