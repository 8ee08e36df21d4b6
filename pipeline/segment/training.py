"""Training loop for segmentation models on in-memory chips. No file I/O here
(``pipeline.stages.train`` reads the chips and saves the model).

Loss: cross-entropy and/or Dice (smp's ``DiceLoss``, multiclass), both ignoring the
label 255 (unlabeled). Augmentation: random flips and 90° rotations. Early stopping on
validation mIoU, computed from a confusion matrix summed over the validation chips
(the same counts-then-metrics path as the evaluate stage). Seeded and deterministic
on the CPU (``torch.use_deterministic_algorithms``, fixed batch order from a seeded
generator); on a GPU it uses bf16 autocast.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.errors import InputError
from pipeline.metrics import confusion_counts, semantic_metrics
from pipeline.nodata import missing

IGNORE = 255


@dataclass
class Chips:
    """Training or validation chips.

    Attributes:
        images: (N, C, T, T) band values in input units (any real dtype).
        labels: (N, T, T) int64 class ids, 255 = unlabeled (ignored by the loss).
        valid: (N, T, T) bool, False where all bands are nodata.
    """

    images: np.ndarray
    labels: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def band_statistics(chips: Chips, nodata: float | None = None) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation over valid pixels (input units), float64 sums;
    missing values of one band at a valid pixel (``nodata``, or not finite) are left out."""
    c = chips.images.shape[1]
    means, stds = [], []
    for b in range(c):
        v = chips.images[:, b][chips.valid].astype(np.float64)
        v = v[~missing(v, nodata)]
        if v.size == 0:
            raise InputError("no valid pixel in the training chips")
        means.append(float(v.mean()))
        stds.append(float(v.std()) or 1.0)
    return means, stds


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    val_loss: float
    val_miou: float
    seconds: float


@dataclass
class TrainResult:
    """The best model (by validation mIoU) and the per-epoch history."""

    net: torch.nn.Module
    best_epoch: int
    best_val_miou: float
    history: list[EpochLog] = field(default_factory=list)


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, jitter: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-sample random 90° rotation and horizontal flip (the dihedral group D4), and with
    ``jitter`` > 0 a per-sample, per-band gain ``1 + U(-jitter, jitter)`` on the normalised
    input (a brightness change of each band, as between acquisitions)."""
    if jitter > 0:
        gain = 1 + (torch.rand(x.shape[:2], generator=gen) * 2 - 1) * jitter
        x = x * gain[:, :, None, None]
    xs, ys = [], []
    ks = torch.randint(0, 4, (len(x),), generator=gen).tolist()
    flips = torch.randint(0, 2, (len(x),), generator=gen).tolist()
    for xi, yi, k, f in zip(x, y, ks, flips):
        xi, yi = torch.rot90(xi, k, (-2, -1)), torch.rot90(yi, k, (-2, -1))
        if f:
            xi, yi = torch.flip(xi, (-1,)), torch.flip(yi, (-1,))
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def class_weights(labels: np.ndarray, n_classes: int, kind: str) -> np.ndarray | None:
    """Per-class loss weights from the training labels (255 ignored).

    ``inverse_sqrt``: ``w_k = 1 / sqrt(f_k)`` with ``f_k`` the class's pixel frequency,
    normalised to mean 1 over the classes present (absent classes get weight 0);
    ``none``: None (unweighted).
    """
    if kind == "none":
        return None
    counts = np.bincount(labels[labels != IGNORE].ravel(), minlength=n_classes)[:n_classes].astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = 1.0 / np.sqrt(counts[present] / counts.sum())
    w[present] /= w[present].mean()
    return w


def make_loss(kind: str, weights: np.ndarray | None = None, device: str = "cpu") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``ce``, ``dice`` or ``ce+dice`` over logits (N, K, H, W) and targets (N, H, W), 255 ignored.

    ``weights`` (K,) weight the cross-entropy term per class.
    """
    from segmentation_models_pytorch.losses import DiceLoss

    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device)
    ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE, weight=w)
    dice = DiceLoss(mode="multiclass", ignore_index=IGNORE, from_logits=True)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if kind == "ce":
            return ce(logits, target)
        if kind == "dice":
            return dice(logits, target)
        return ce(logits, target) + dice(logits, target)

    return loss


def train(
    net: torch.nn.Module,
    normalise: Callable[[np.ndarray, np.ndarray], np.ndarray],
    train_chips: Chips,
    val_chips: Chips,
    n_classes: int,
    *,
    epochs: int,
    patience: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    loss: str,
    weighting: str = "none",
    schedule: str = "constant",
    jitter: float = 0.0,
    seed: int,
    device: str,
    log_path: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``net`` with AdamW; keep the weights of the epoch with the best validation mIoU.

    Args:
        normalise: ``(images (N, C, T, T), valid (N, T, T)) -> float32`` model input.
        log_path: if given, one JSON line per epoch is appended there.

    Raises:
        InputError: no training chip.
    """
    if len(train_chips) == 0:
        raise InputError("no training chip holds a labeled pixel; check train.train_area and the ground truth")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    # cosine: the learning rate decays from lr to 0 over `epochs` (Loshchilov & Hutter, SGDR, 2017)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs) if schedule == "cosine" else None
    weights = class_weights(train_chips.labels, n_classes, weighting)
    crit = make_loss(loss, weights, device)

    x_train = torch.from_numpy(normalise(train_chips.images, train_chips.valid))
    y_train = torch.from_numpy(train_chips.labels.astype(np.int64))
    x_val = torch.from_numpy(normalise(val_chips.images, val_chips.valid))
    y_val = torch.from_numpy(val_chips.labels.astype(np.int64))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    best = TrainResult(net, -1, -1.0)
    best_state = copy.deepcopy(net.state_dict())
    since_best = 0
    bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            net.train()
            order = torch.randperm(len(x_train), generator=gen)
            total, n = 0.0, 0
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                xb, yb = _augment(x_train[idx], y_train[idx], gen, jitter)
                xb, yb = xb.to(device), yb.to(device)
                with autocast:
                    out = net(xb)
                lo = crit(out, yb)
                opt.zero_grad(set_to_none=True)
                lo.backward()
                opt.step()
                total += float(lo.detach()) * len(idx)
                n += len(idx)
            if sched is not None:
                sched.step()
            val_loss, val_miou = _validate(net, x_val, y_val, crit, n_classes, batch_size, device, autocast)
            entry = EpochLog(epoch, total / n, val_loss, val_miou, time.perf_counter() - t0)
            best.history.append(entry)
            if log_path is not None:
                with open(log_path, "a") as f:
                    row = {k: (None if isinstance(v, float) and v != v else v) for k, v in entry.__dict__.items()}
                    f.write(json.dumps(row) + "\n")  # NaN (no validation) as null: strict JSON
            bar.set_postfix(loss=f"{entry.train_loss:.3f}", val_mIoU=f"{val_miou:.3f}")
            if len(val_chips) == 0:  # no validation (a refit): keep the last epoch, run them all
                best.best_epoch, best_state = epoch, copy.deepcopy(net.state_dict())
            elif val_miou > best.best_val_miou:
                best.best_val_miou, best.best_epoch = val_miou, epoch
                best_state = copy.deepcopy(net.state_dict())
                since_best = 0
            else:
                since_best += 1
                if since_best >= patience:
                    break
    finally:
        bar.close()
        torch.use_deterministic_algorithms(was_deterministic)
    net.load_state_dict(best_state)
    best.net = net.eval()
    return best


def _validate(net, x, y, crit, n_classes, batch_size, device, autocast) -> tuple[float, float]:
    """Validation loss and mIoU (from one confusion matrix over all labeled validation pixels)."""
    if len(x) == 0:
        return float("nan"), float("nan")
    net.eval()
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    total = 0.0
    with torch.inference_mode():
        for b in range(0, len(x), batch_size):
            xb, yb = x[b : b + batch_size].to(device), y[b : b + batch_size].to(device)
            with autocast:
                out = net(xb)
            total += float(crit(out, yb)) * len(xb)
            pred = out.float().argmax(dim=1).cpu().numpy()
            gt = yb.cpu().numpy()
            keep = gt != IGNORE
            cm += confusion_counts(gt[keep], pred[keep], n_classes)
    return total / len(x), semantic_metrics(cm).miou
