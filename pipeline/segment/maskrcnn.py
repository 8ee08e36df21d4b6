"""Mask R-CNN (torchvision) for instance segmentation: build, targets, training, tiled inference.

Model: torchvision's Mask R-CNN with a ResNet-FPN backbone, nothing pretrained (offline):
``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)`` for
``encoder: resnet50``, or the same head on ``resnet_fpn_backbone`` for resnet18/34/101
(smaller, faster on a CPU). Two classes: 0 background, 1 object. With no pretrained
weights the backbone keeps trainable ``BatchNorm2d`` (as torchvision does then).

Bands: any number. The backbone's first convolution is rebuilt with one input channel per
band (no replication of a single band to RGB), and torchvision's own normalisation is
neutralised (``image_mean`` 0, ``image_std`` 1); the input is normalised beforehand with the
per-band mean and standard deviation of the training pixels stored in the sidecar
(:func:`pipeline.segment.unet.normalise`, exactly as for the U-Net).

Scale: torchvision resizes every image so that its short side is ``min_size``. Here the
transform's ``min_size`` and ``max_size`` both equal the (square) image edge the model is
fed (the training chip, or the inference window), so the scale factor is exactly 1 and
objects keep their size in pixels.

Anchors: one anchor size per FPN level (``ModelSpec.anchor_sizes``, default 16, 32, 64,
128, 256 px, aspect ratios 0.5, 1, 2): half of torchvision's default (32 ... 512), since
nuclei and cells are often 10-40 px across.

Checkpoints are the same two files as for the U-Net: ``NAME.safetensors`` (weights, never
pickled) and ``NAME.json`` (:class:`pipeline.segment.unet.ModelSpec` with ``arch:
maskrcnn``, ``encoder`` the backbone, ``target: instances``); see
:func:`pipeline.segment.unet.save_model` / :func:`~pipeline.segment.unet.load_model`.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from pipeline.errors import InputError

ARCH = "maskrcnn"
#: Class names of a Mask R-CNN model (torchvision's label ids).
CLASSES = ["background", "object"]
DEFAULT_ANCHORS = [16, 32, 64, 128, 256]
_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
#: RPN proposals kept before / after NMS per image (training, inference), and proposals
#: sampled per image for the box head in training: a quarter of torchvision's
#: 2000/1000 and 512, which are sized for 800 px photographs; a window here is a few
#: hundred px, and the mask head (four 256-channel convolutions per RoI) dominates CPU time
_SIZES = dict(rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=1000,
              rpn_post_nms_top_n_test=500, box_batch_size_per_image=128)  # fmt: skip


def build_maskrcnn(spec, size: int | None = None) -> nn.Module:
    """Mask R-CNN for ``spec`` (a :class:`pipeline.segment.unet.ModelSpec` with ``arch: maskrcnn``).

    Args:
        spec: bands (input channels), encoder (the ResNet backbone), anchor sizes.
        size: edge (px) of the square images the model will see; the transform's
            ``min_size = max_size = size`` so images are never rescaled. Default: ``spec.tile_size``.

    Returns:
        a ``torchvision.models.detection.MaskRCNN`` with random weights.

    Raises:
        InputError: an unknown backbone, or not 5 anchor sizes.
    """
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    if spec.encoder not in _BACKBONES:
        raise InputError(f"Mask R-CNN backbone {spec.encoder!r} is not one of {list(_BACKBONES)}; set train.encoder")
    anchors = spec.anchor_sizes or DEFAULT_ANCHORS
    if len(anchors) != 5:
        raise InputError(f"Mask R-CNN needs 5 anchor sizes (one per FPN level), got {anchors}")
    n_in = len(spec.bands)
    size = size or spec.tile_size
    kwargs = dict(
        num_classes=len(CLASSES), min_size=size, max_size=size, image_mean=[0.0] * n_in, image_std=[1.0] * n_in,
        rpn_anchor_generator=AnchorGenerator(tuple((int(a),) for a in anchors), ((0.5, 1.0, 2.0),) * 5),
        **_SIZES,
    )  # fmt: skip
    if spec.encoder == "resnet50":
        net = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    else:
        backbone = resnet_fpn_backbone(backbone_name=spec.encoder, weights=None, norm_layer=nn.BatchNorm2d,
                                       trainable_layers=5)  # fmt: skip
        net = MaskRCNN(backbone, **kwargs)
    net.backbone.body.conv1 = nn.Conv2d(n_in, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


# --------------------------------------------------------------------------- targets
def instance_targets(instances: np.ndarray) -> dict[str, torch.Tensor]:
    """torchvision detection targets from an instance mask.

    Args:
        instances: (y, x) integer ids, 0 = background (negative values count as background);
            each other id is one object (its pixels need not be connected).

    Returns:
        ``boxes`` float32 (N, 4) as (x0, y0, x1, y1) in pixel-edge coordinates: pixel
        (r, c) spans [c, c + 1) x [r, r + 1), so x1 = last column + 1 and a box's area
        equals its pixel extent (torchvision's ``masks_to_boxes`` gives x1 = last column
        instead); ``labels`` int64 (N,) all 1; ``masks`` uint8 (N, y, x). Objects in
        increasing id order. N = 0 gives (0, 4), (0,) and (0, y, x) tensors.
    """
    inst = np.asarray(instances)
    ids = np.unique(inst)
    ids = ids[ids > 0]
    h, w = inst.shape
    masks = np.zeros((len(ids), h, w), dtype=np.uint8)
    boxes = np.zeros((len(ids), 4), dtype=np.float32)
    for k, i in enumerate(ids):
        m = inst == i
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        masks[k] = m
    return {"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(ids), dtype=torch.int64),
            "masks": torch.from_numpy(masks)}  # fmt: skip


# --------------------------------------------------------------------------- training
@dataclass
class MaskRCNNHistory:
    """Per-epoch mean losses (sum of torchvision's five loss terms) and the kept epoch."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1


def select_chips(instances: np.ndarray, negatives: float, seed: int) -> np.ndarray:
    """Indices of the chips to train on: every chip holding an object, plus a seeded random
    ``negatives`` fraction (of the object chips' count) of chips without any.

    Args:
        instances: (N, T, T) ids, 0 or negative = no object.
    """
    has = (instances > 0).reshape(len(instances), -1).any(axis=1)
    pos, neg = np.flatnonzero(has), np.flatnonzero(~has)
    n_neg = min(len(neg), int(round(negatives * len(pos))))
    pick = np.random.default_rng(seed).choice(neg, size=n_neg, replace=False) if n_neg else neg[:0]
    return np.sort(np.concatenate([pos, pick]))


def _flip(x: torch.Tensor, inst: np.ndarray, gen: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Random horizontal and vertical flip of one (C, T, T) chip and its (T, T) ids."""
    hflip, vflip = torch.randint(0, 2, (2,), generator=gen).tolist()
    if hflip:
        x, inst = torch.flip(x, (-1,)), inst[:, ::-1]
    if vflip:
        x, inst = torch.flip(x, (-2,)), inst[::-1, :]
    return x, np.ascontiguousarray(inst)


def _losses(net: nn.Module, x: torch.Tensor, inst: np.ndarray, device: str) -> torch.Tensor:
    targets = [{k: v.to(device) for k, v in instance_targets(i).items()} for i in inst]
    return sum(net([xi.to(device) for xi in x], targets).values())


def _val_loss(net: nn.Module, x: torch.Tensor, inst: np.ndarray, batch_size: int, device: str) -> float:
    """Mean loss on validation chips: torchvision computes losses only in training mode, so
    the network is in training mode with every BatchNorm frozen (eval), under no_grad."""
    if len(x) == 0:
        return float("nan")
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    total = 0.0
    with torch.no_grad():
        for b in range(0, len(x), batch_size):
            xb, ib = x[b : b + batch_size], inst[b : b + batch_size]
            total += float(_losses(net, xb, ib, device)) * len(xb)
    return total / len(x)


def train_maskrcnn(
    net: nn.Module,
    images: np.ndarray,
    instances: np.ndarray,
    val_images: np.ndarray,
    val_instances: np.ndarray,
    *,
    epochs: int,
    patience: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: str,
    clip_norm: float = 10.0,
    rois_per_image: int | None = None,
    log_path: Path | None = None,
    progress: bool = True,
) -> MaskRCNNHistory:
    """Train ``net`` in place with AdamW; keep the weights of the epoch with the lowest
    validation loss (the last epoch when there is no validation chip).

    Seeded and deterministic on the CPU (``torch.use_deterministic_algorithms``, batch order
    and flips from a seeded generator). Gradients are clipped to norm ``clip_norm``: a Mask
    R-CNN trained from scratch otherwise diverges in its first steps. During the first epoch
    the learning rate rises linearly from lr/1000 to lr over min(1000, batches - 1) batches, as
    in torchvision's detection reference training (``references/detection/train.py``).
    Augmentation: random horizontal and vertical flips (boxes and masks recomputed from the
    flipped ids).

    Args:
        images, val_images: (N, C, T, T) float32, already normalised.
        instances, val_instances: (N, T, T) int64 ids, 0 (or negative) = background.
        rois_per_image: proposals sampled per chip for the box and mask heads (None: as built,
            128); the mask head's cost on a CPU grows with it.
        log_path: if given, one JSON line per epoch (train_loss, val_loss) is appended there.

    Returns:
        the loss history; ``net`` holds the kept weights, in eval mode.

    Raises:
        InputError: no training chip.
    """
    if len(images) == 0:
        raise InputError("no training chip for Mask R-CNN; check train.train_area and the instance ground truth")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    net = net.to(device)
    if rois_per_image is not None:
        net.roi_heads.fg_bg_sampler.batch_size_per_image = rois_per_image
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    warmup_steps = min(1000, -(-len(images) // batch_size) - 1)
    warmup = None
    if warmup_steps:
        warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=warmup_steps)
    x_tr, x_va = torch.from_numpy(np.ascontiguousarray(images, np.float32)), torch.from_numpy(
        np.ascontiguousarray(val_images, np.float32))  # fmt: skip
    hist = MaskRCNNHistory()
    best, best_state, since = float("inf"), copy.deepcopy(net.state_dict()), 0
    bar = tqdm(range(1, epochs + 1), desc="train maskrcnn", unit="epoch", disable=not progress)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            net.train()
            order = torch.randperm(len(x_tr), generator=gen).tolist()
            total = 0.0
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                pairs = [_flip(x_tr[i], instances[i], gen) for i in idx]
                loss = _losses(net, torch.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip_norm)
                opt.step()
                if warmup is not None and epoch == 1:
                    warmup.step()
                total += float(loss.detach()) * len(idx)
            hist.train_loss.append(total / len(order))
            hist.val_loss.append(_val_loss(net, x_va, val_instances, batch_size, device))
            if log_path is not None:
                v = hist.val_loss[-1]
                row = {"epoch": epoch, "train_loss": hist.train_loss[-1], "val_loss": None if v != v else v,
                       "seconds": time.perf_counter() - t0}  # fmt: skip
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", val=f"{hist.val_loss[-1]:.3f}")
            score = hist.val_loss[-1] if len(x_va) else -epoch  # no validation: keep the last epoch
            if score < best:
                best, hist.best_epoch, best_state, since = score, epoch, copy.deepcopy(net.state_dict()), 0
            else:
                since += 1
                if since >= patience:
                    break
    finally:
        bar.close()
        torch.use_deterministic_algorithms(was_deterministic)
    net.load_state_dict(best_state)
    net.eval()
    return hist


# --------------------------------------------------------------------------- inference
@dataclass(frozen=True)
class MaskRCNNParams:
    """Inference parameters of :func:`maskrcnn_instances` (sizes in pixels).

    Attributes:
        window: edge of the square windows the model sees (a multiple of 32); a block
            larger than this is run in overlapping windows.
        overlap: overlap of neighbouring windows; must exceed the largest object's
            diameter so that every object lies wholly inside some window.
        score: detections scoring at or below this are dropped (as torchvision does).
        mask: a detection's mask is its pixels with mask probability >= this.
        max_claimed: a detection whose mask is already claimed by higher-scoring ones
            for more than this fraction is a duplicate and dropped.
        min_size_px: pieces smaller than this (after claiming) are dropped.
        max_detections: detections kept per window (torchvision's ``detections_per_img``).
        nodata: the input's nodata value: one band missing at an otherwise valid pixel
            (this value, or not finite) is given the band mean, as for the U-Net
            (:func:`pipeline.segment.unet.normalise`).
    """

    window: int = 256
    overlap: int = 64
    score: float = 0.5
    mask: float = 0.5
    max_claimed: float = 0.5
    min_size_px: int = 8
    max_detections: int = 300
    nodata: float | None = None

    def __post_init__(self) -> None:
        if self.window < 32 or self.window % 32:
            raise InputError(f"Mask R-CNN window must be a multiple of 32 px, got {self.window}")
        if not 0 <= self.overlap < self.window:
            raise InputError(f"Mask R-CNN window overlap must be in [0, window), got {self.overlap}")
        for name in ("score", "mask", "max_claimed"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"Mask R-CNN {name} threshold must be in [0, 1], got {getattr(self, name)}")


def window_origins(size: int, window: int, overlap: int) -> list[int]:
    """Window starts along one axis of ``size`` px: 0, S, 2S, ... (S = window - overlap),
    the last one moved back to ``size - window`` so that no window passes the end; a single
    window at 0 when ``size <= window``."""
    if size <= window:
        return [0]
    step = window - overlap
    starts = list(range(0, size - window, step)) + [size - window]
    return sorted(set(starts))


def setup_inference(net: nn.Module, params: MaskRCNNParams) -> nn.Module:
    """Set ``net`` up for :func:`maskrcnn_instances`: images of ``params.window`` px are
    never rescaled, detections scoring under ``params.score`` are dropped before the mask
    head runs, and at most ``params.max_detections`` are kept per window.
    Returns ``net`` (in eval mode)."""
    net.transform.min_size, net.transform.max_size = (params.window,), params.window
    net.roi_heads.detections_per_img = params.max_detections
    net.roi_heads.score_thresh = params.score
    return net.eval()


_CACHE: dict[tuple, tuple[nn.Module, object]] = {}
_LOCK = threading.Lock()


def cached_maskrcnn(path: str | Path, device: str, params: MaskRCNNParams):
    """The process-wide ``(module, spec)`` of a saved Mask R-CNN, loaded on first use and
    set up for ``params`` (:func:`setup_inference`); one instance per path, device, window,
    detection count and score threshold, so a Dask worker loads it once and never changes a shared model.

    Raises:
        InputError: the model is not a Mask R-CNN (or see :func:`pipeline.segment.unet.load_model`).
    """
    from pipeline.segment.unet import load_model

    key = (str(Path(path).resolve()), device, params.window, params.max_detections, params.score)
    with _LOCK:
        if key not in _CACHE:
            net, spec = load_model(path, device)
            if spec.arch != ARCH:
                raise InputError(f"{path} is a {spec.arch} model, not a Mask R-CNN")
            _CACHE[key] = (setup_inference(net, params), spec)
        return _CACHE[key]


def detect(net: nn.Module, x: np.ndarray, device: str) -> list[dict[str, np.ndarray]]:
    """Run the model on normalised (N, C, H, W) float32 windows (N independent images).

    Returns:
        per window: ``scores`` (D,) float32, descending; ``boxes`` (D, 4) (x0, y0, x1, y1)
        pixel-edge coordinates; ``masks`` (D, H, W) float32 mask probabilities.
    """
    with torch.inference_mode():
        out = net([torch.from_numpy(np.ascontiguousarray(xi, np.float32)).to(device) for xi in x])
    return [{"scores": o["scores"].float().cpu().numpy(), "boxes": o["boxes"].float().cpu().numpy(),
             "masks": o["masks"][:, 0].float().cpu().numpy()} for o in out]  # fmt: skip


def maskrcnn_instances(block: np.ndarray, valid: np.ndarray, net: nn.Module, spec, params: MaskRCNNParams,
                       device: str = "cpu") -> np.ndarray:  # fmt: skip
    """Instance ids of one block (a chunk plus its halo) from a Mask R-CNN.

    The block is normalised with the sidecar's statistics (nodata pixels set to the band
    mean, 0) and cut into ``params.window`` px windows (:func:`window_origins`); a block
    smaller than a window is padded with 0 (the band mean) up to it. Detections scoring
    above ``params.score`` are kept, except those whose box comes within 2 px of a window
    edge that lies inside the block (those objects are cut; with ``overlap`` larger than
    any object, the neighbouring window holds them whole). The kept masks (probability
    ``>= params.mask``) are pasted in descending score order (ties: window order, then
    torchvision's order), each only onto valid pixels no earlier detection claimed;
    a detection more than ``params.max_claimed`` claimed already is a duplicate and
    dropped, as is a remaining piece under ``params.min_size_px``.

    Locality: a pixel's label depends on the windows that cover it (input within
    ``params.window`` px of it) and on the detections overlapping it. Windows are laid out
    from the block's own origin, so two blocks covering the same object need not give it
    exactly the same mask; the chunk stitcher merges such pieces by overlap.

    Args:
        block: (band, y, x) input units, the model's bands in the model's order.
        valid: (y, x) bool, False = nodata (never labeled).
        net, spec: from :func:`cached_maskrcnn`, or a module passed through :func:`setup_inference`.

    Returns:
        int64 (y, x): 0 background, objects 1..n numbered in paste order.

    Raises:
        InputError: band count or shapes do not match.
    """
    from pipeline.segment.unet import normalise

    if block.ndim != 3 or block.shape[0] != len(spec.bands):
        raise InputError(f"the Mask R-CNN expects ({len(spec.bands)}, y, x) input ({spec.bands}), got {block.shape}")
    if valid.shape != block.shape[1:]:
        raise InputError(f"valid mask {valid.shape} does not match the block's (y, x) {block.shape[1:]}")
    h, w = valid.shape
    win = params.window
    x = normalise(block[None], spec, valid[None], params.nodata)[0]
    ph, pw = max(h, win), max(w, win)
    if (ph, pw) != (h, w):
        x = np.pad(x, ((0, 0), (0, ph - h), (0, pw - w)))
    ys, xs = window_origins(ph, win, params.overlap), window_origins(pw, win, params.overlap)
    origins = [(r, c) for r in ys for c in xs]
    # each kept detection: (-score, order, top row, left col, mask crop), block coordinates
    found: list[tuple[float, int, int, int, np.ndarray]] = []
    for r, c in origins:
        (det,) = detect(net, x[None, :, r : r + win, c : c + win], device)
        inner = (c > 0, r > 0, c + win < pw, r + win < ph)  # window edges inside the block: left, top, right, bottom
        for s, (x0, y0, x1, y1), m in zip(det["scores"], det["boxes"], det["masks"]):
            cut = (inner[0] and x0 < 2) or (inner[1] and y0 < 2) or (inner[2] and x1 > win - 2) or (
                inner[3] and y1 > win - 2)  # fmt: skip
            m = m >= params.mask
            if s <= params.score or cut or not m.any():
                continue
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            crop = m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            found.append((-float(s), len(found), r + int(rows[0]), c + int(cols[0]), crop))
    found.sort(key=lambda t: (t[0], t[1]))
    labels = np.zeros((h, w), dtype=np.int64)
    n = 0
    for _, _, r0, c0, crop in found:
        area = int(crop.sum())
        r1, c1 = min(r0 + crop.shape[0], h), min(c0 + crop.shape[1], w)
        if r1 <= r0 or c1 <= c0:  # wholly in the padding
            continue
        view = labels[r0:r1, c0:c1]
        inside = crop[: r1 - r0, : c1 - c0]
        claimed = int((inside & (view != 0)).sum())
        piece = inside & valid[r0:r1, c0:c1] & (view == 0)
        got = int(piece.sum())
        if claimed > params.max_claimed * area or got < params.min_size_px:
            continue
        n += 1
        view[piece] = n
    return labels


def maskrcnn_kernel(model_path: str | Path, params: MaskRCNNParams = MaskRCNNParams(), device: str = "cpu"):
    """The per-chunk kernel ``kernel(block, valid) -> labels`` of :func:`maskrcnn_instances`
    for a saved model; the model is loaded once per process (:func:`cached_maskrcnn`).
    The kernel is a small picklable object, fine to send to Dask workers."""
    return _MaskRCNNKernel(str(model_path), params, device)


@dataclass(frozen=True)
class _MaskRCNNKernel:
    model_path: str
    params: MaskRCNNParams
    device: str

    def __call__(self, block: np.ndarray, valid: np.ndarray) -> np.ndarray:
        net, spec = cached_maskrcnn(self.model_path, self.device, self.params)
        return maskrcnn_instances(block, valid, net, spec, self.params, self.device)


__all__ = [
    "CLASSES", "MaskRCNNParams", "MaskRCNNHistory", "build_maskrcnn", "cached_maskrcnn", "detect",
    "instance_targets", "maskrcnn_instances", "maskrcnn_kernel", "select_chips", "setup_inference", "train_maskrcnn",
    "window_origins",
]  # fmt: skip
