"""Mask R-CNN: targets, training through stages.train, the per-chunk kernel, checkpoints."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline import stages
from pipeline.config import BBox, GroundTruthConfig, IngestConfig, MaskRCNNTrainConfig, TrainConfig
from pipeline.errors import InputError
from pipeline.segment.maskrcnn import (
    CLASSES,
    MaskRCNNParams,
    instance_targets,
    maskrcnn_instances,
    maskrcnn_kernel,
    select_chips,
    setup_inference,
    window_origins,
)
from pipeline.segment.unet import ModelSpec, build_model, load_model, load_spec, save_model
from tests import synth
from tests.synth_instances import blob_image, blob_instances


def _spec(**kw) -> ModelSpec:
    base = dict(arch="maskrcnn", encoder="resnet18", bands=["DAPI"], mean=[700.0], std=[400.0], classes=CLASSES,
                tile_size=64, target="instances", anchor_sizes=[8, 16, 32, 64, 128])  # fmt: skip
    base.update(kw)
    return ModelSpec(**base)


def test_targets_from_a_hand_made_mask():
    ids = np.zeros((10, 12), dtype=np.int32)
    ids[2:5, 3:9] = 4  # rows 2-4, cols 3-8
    ids[7, 0] = 9  # one pixel
    ids[6:10, 10:12] = -1  # negative: not an object
    t = instance_targets(ids)
    np.testing.assert_array_equal(t["boxes"].numpy(), [[3, 2, 9, 5], [0, 7, 1, 8]])  # x0, y0, x1, y1 (pixel edges)
    np.testing.assert_array_equal(t["labels"].numpy(), [1, 1])
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, 10, 12)
    np.testing.assert_array_equal(t["masks"][0].numpy(), ids == 4)
    np.testing.assert_array_equal(t["masks"][1].numpy(), ids == 9)
    empty = instance_targets(np.zeros((5, 6), np.int64))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 5, 6) and empty["labels"].shape == (0,)


def test_select_chips_keeps_objects_and_a_fraction_of_negatives():
    inst = np.zeros((10, 4, 4), np.int64)
    inst[[1, 3, 5, 7], 1, 1] = 2
    inst[0, 0, 0] = -1  # unlabeled only: a negative
    keep = select_chips(inst, negatives=0.5, seed=0)
    assert set([1, 3, 5, 7]) <= set(keep) and len(keep) == 6
    np.testing.assert_array_equal(keep, select_chips(inst, negatives=0.5, seed=0))
    assert list(select_chips(inst, negatives=0.0, seed=0)) == [1, 3, 5, 7]


def test_window_origins_cover_the_block():
    assert window_origins(100, 128, 32) == [0]
    assert window_origins(300, 128, 32) == [0, 96, 172]
    for size in (129, 256, 257, 1000):
        o = window_origins(size, 128, 32)
        assert o[0] == 0 and o[-1] == size - 128 and all(b - a <= 96 for a, b in zip(o, o[1:]))


def test_checkpoint_round_trip_and_pickle_refused(tmp_path):
    torch.manual_seed(0)
    spec = _spec()
    net = build_model(spec).eval()
    path = save_model(net, spec, tmp_path / "mr.safetensors")
    loaded, spec2 = load_model(path)
    assert spec2.save_id and spec2.model_copy(update={"save_id": None}) == spec
    a, b = net.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = [torch.randn(1, 64, 64)]
    with torch.inference_mode():
        oa, ob = net(x)[0], loaded(x)[0]
    assert torch.equal(oa["boxes"], ob["boxes"]) and torch.equal(oa["masks"], ob["masks"])

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"x": Boom()}, path)  # a pickle where the weights should be
    with pytest.raises(InputError, match="not a safetensors file"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()


class _Fixed(nn.Module):
    """Stands in for a Mask R-CNN: returns the same detections for every window."""

    def __init__(self, dets: list[tuple[float, tuple[int, int, int, int]]], size: int):
        super().__init__()
        self.dets, self.size = dets, size
        self.seen: list[tuple[int, ...]] = []

    def forward(self, images):
        out = []
        for im in images:
            self.seen.append(tuple(im.shape))
            masks = torch.zeros(len(self.dets), 1, self.size, self.size)
            for k, (_, (r0, c0, r1, c1)) in enumerate(self.dets):
                masks[k, 0, r0:r1, c0:c1] = 0.9
            boxes = torch.tensor([[c0, r0, c1, r1] for _, (r0, c0, r1, c1) in self.dets], dtype=torch.float32)
            out.append({"scores": torch.tensor([s for s, _ in self.dets]), "boxes": boxes, "masks": masks})
        return out


def test_pasting_order_duplicates_min_size_and_nodata():
    spec = _spec()
    dets = [
        (0.6, (10, 10, 20, 20)),  # 10 x 10, lower score than the next one which overlaps it
        (0.9, (15, 15, 25, 25)),  # pasted first: keeps all its 100 px
        (0.8, (15, 16, 25, 25)),  # 90% claimed by the 0.9 one: a duplicate, dropped
        (0.7, (40, 40, 42, 42)),  # 4 px: below min size
        (0.3, (50, 50, 60, 60)),  # below the score threshold
        (0.95, (30, 0, 40, 10)),  # half on nodata: only its valid pixels
    ]  # fmt: skip
    net = _Fixed(dets, 64)
    valid = np.ones((64, 64), bool)
    valid[:, :5] = False
    params = MaskRCNNParams(window=64, overlap=16, score=0.5, min_size_px=8)
    lab = maskrcnn_instances(np.full((1, 64, 64), 700.0, np.float32), valid, net, spec, params)
    assert lab.dtype == np.int64 and lab.shape == (64, 64)
    assert sorted(np.unique(lab)) == [0, 1, 2, 3]
    assert (lab[30:40, 5:10] == 1).all() and (lab[:, :5] == 0).all()  # score 0.95 first, only valid pixels
    assert (lab[15:25, 15:25] == 2).all()  # score 0.9
    first = lab == 3  # score 0.6: what the 0.9 one left of it
    assert first.sum() == 100 - 25 and first[10:15, 10:20].all() and not first[15:20, 15:20].any()
    assert (lab[40:42, 40:42] == 0).all() and (lab[50:60, 50:60] == 0).all()


def test_large_blocks_run_in_windows_and_cut_detections_are_dropped():
    spec = _spec()
    # in every window: one object inside, one touching the window's left edge
    net = _Fixed([(0.9, (20, 20, 30, 30)), (0.8, (40, 0, 50, 10))], 64)
    params = MaskRCNNParams(window=64, overlap=32, min_size_px=1)
    lab = maskrcnn_instances(np.zeros((1, 100, 130), np.float32), np.ones((100, 130), bool), net, spec, params)
    assert set(net.seen) == {(1, 64, 64)}
    assert len(net.seen) == len(window_origins(100, 64, 32)) * len(window_origins(130, 64, 32))
    # the left-edge object survives only in windows whose left edge is the block's
    assert (lab[40:50, 0:10] > 0).all()
    assert (lab[76:86, 32:42] == 0).all() and (lab[40:50, 32:42] == 0).all()
    assert (lab[20:30, 20:30] > 0).all() and (lab[20:30, 52:62] > 0).all()
    # a small block is padded up to one window
    net.seen.clear()
    small = maskrcnn_instances(np.zeros((1, 40, 50), np.float32), np.ones((40, 50), bool), net, spec, params)
    assert net.seen == [(1, 64, 64)] and small.shape == (40, 50) and (small[20:30, 20:30] == 1).all()


def test_a_band_missing_at_a_valid_pixel_reaches_the_model_as_the_band_mean():
    class _Seen(_Fixed):
        def forward(self, images):
            self.inputs = [im.clone() for im in images]
            return super().forward(images)

    spec = _spec()
    block = np.full((1, 64, 64), 5.0, np.float32)
    block[0, 10:20, 10:20] = -9999  # this band's nodata at pixels that are valid (other bands, or the mask)
    block[0, 30:40, 30:40] = np.inf
    net = _Seen([], 64)
    maskrcnn_instances(block, np.ones((64, 64), bool), net, spec, MaskRCNNParams(window=64, overlap=16, nodata=-9999))
    x = net.inputs[0][0].numpy()
    assert (x[10:20, 10:20] == 0).all() and (x[30:40, 30:40] == 0).all()  # normalised band mean
    assert np.isfinite(x).all() and (x[50:, 50:] != 0).all()


def test_refuses_a_block_with_other_bands():
    with pytest.raises(InputError, match=r"expects \(1, y, x\)"):
        maskrcnn_instances(np.zeros((3, 64, 64), np.float32), np.ones((64, 64), bool), _Fixed([], 64), _spec(),
                           MaskRCNNParams(window=64, overlap=16))  # fmt: skip
    with pytest.raises(InputError, match="multiple of 32"):
        MaskRCNNParams(window=100)


@pytest.fixture(scope="module")
def blob_scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("mrblobs")
    ids = blob_instances(64, 64, n=12, seed=5, radius=(3, 6))
    tif = synth.write_tif(d / "img.tif", blob_image(ids, seed=6), names=["DAPI"])
    gt = synth.write_tif(d / "ids.tif", ids.astype(np.uint16))
    store = stages.ingest([tif], d / "s.zarr", IngestConfig(chunk_size=64), progress=False)
    return store, gt


def test_training_through_stages_lowers_the_loss_and_the_kernel_runs(blob_scene, tmp_path):
    store, gt = blob_scene
    x0, y1 = synth.ORIGIN  # 10 m pixels: rows 0-31 train, rows 32-63 validate
    cfg = TrainConfig(
        arch="maskrcnn", encoder="resnet18", maskrcnn=MaskRCNNTrainConfig(anchor_sizes=[8, 16, 32, 64, 128],
                                                                          rois_per_image=16),
        train_area=BBox(xmin=x0, ymin=y1 - 320, xmax=x0 + 640, ymax=y1),
        val_area=BBox(xmin=x0, ymin=y1 - 640, xmax=x0 + 640, ymax=y1 - 320),
        tile=32, stride=32, epochs=8, patience=8, batch_size=2, lr=1e-4, seed=0, device="cpu",
        out=tmp_path / "mr.safetensors",
    )  # fmt: skip
    path = stages.train(store, cfg, GroundTruthConfig(path=gt), [], progress=False)
    log = [json.loads(line) for line in path.with_suffix(".log.jsonl").read_text().splitlines()]
    losses = [e["train_loss"] for e in log]
    assert len(log) == 8 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    val = [e["val_loss"] for e in log]
    assert all(np.isfinite(val)) and val[-1] < val[0], val
    spec = load_spec(path)
    assert spec.trained["best_epoch"] == 1 + int(np.argmin(val))  # the epoch with the lowest validation loss
    assert spec.arch == "maskrcnn" and spec.target == "instances" and spec.classes == CLASSES
    assert spec.anchor_sizes == [8, 16, 32, 64, 128] and spec.trained["train_chips"] == 2

    kernel = maskrcnn_kernel(path, MaskRCNNParams(window=32, overlap=8, score=0.05, min_size_px=1, max_detections=20))
    block = np.random.default_rng(0).uniform(200, 1200, (1, 40, 45)).astype(np.float32)
    valid = np.ones((40, 45), bool)
    valid[:10] = False
    lab = kernel(block, valid)
    assert lab.dtype == np.int64 and lab.shape == (40, 45)
    assert (lab[:10] == 0).all() and lab.min() >= 0
    np.testing.assert_array_equal(lab, kernel(block, valid))  # deterministic on the CPU


def test_segment_stage_refuses_a_maskrcnn_model(blob_scene, tmp_path):
    from pipeline.config import SegmentConfig, UNetConfig

    store, _ = blob_scene
    spec = _spec()
    path = save_model(build_model(spec), spec, tmp_path / "mr.safetensors")
    with pytest.raises(InputError, match="Mask R-CNN"):
        stages.segment(store, SegmentConfig(method="unet", unet=UNetConfig(model=path, window=64, device="cpu")),
                       progress=False)  # fmt: skip


def test_config_refuses_maskrcnn_with_a_target():
    from pydantic import ValidationError

    area = BBox(xmin=0, ymin=0, xmax=1, ymax=1)
    with pytest.raises(ValidationError, match="instance ids"):
        TrainConfig(arch="maskrcnn", target="instance_boundary", train_area=area, val_area=area)
    _ = setup_inference  # public helper used by cached models


def test_instances_stage_runs_a_maskrcnn(blob_scene, tmp_path):
    """`instances.method: maskrcnn` through instance_stages.segment_instances (wiring: halo and
    window overlap from max_diameter, ids written; an untrained model finds little)."""
    import xarray as xr

    from pipeline import instance_stages
    from pipeline.config import InstanceConfig, LearnedInstanceConfig
    from pipeline.errors import ConfigError

    store, _ = blob_scene
    torch.manual_seed(0)
    spec = _spec()
    path = save_model(build_model(spec), spec, tmp_path / "mr.safetensors")
    cfg = InstanceConfig(method="maskrcnn", max_diameter=12,
                         learned=LearnedInstanceConfig(model=path, window=32, device="cpu"))  # fmt: skip
    instance_stages.segment_instances(store, cfg, progress=False)
    da = xr.open_zarr(store)["instances"]
    assert da.attrs["method"] == "maskrcnn" and da.attrs["halo_px"] == 12 and da.shape == (64, 64)
    assert da.dtype.kind == "u"
    with pytest.raises(ConfigError, match="window"):
        instance_stages.segment_instances(store, cfg.model_copy(update={"max_diameter": 30}), progress=False)
