"""Tiny U-Net checkpoints made in code (seconds on a CPU) for the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.segment.unet import ModelSpec, build_model, save_model

BANDS = ["B02", "B03", "B04", "B08"]


def tiny_spec(**kw) -> ModelSpec:
    """A 2-stage smp U-Net (ResNet-18 encoder) for 4 bands and 3 classes; ``kw`` overrides fields."""
    base = dict(arch="Unet", encoder="resnet18", encoder_depth=2, decoder_channels=[16, 8], bands=BANDS,
                mean=[2000.0] * 4, std=[1000.0] * 4, classes=["a", "b", "c"], tile_size=64)  # fmt: skip
    base.update(kw)
    return ModelSpec(**base)


def tiny_unet(path: Path, seed: int = 0, scale: float = 3.0, **kw) -> Path:
    """Save a seeded random :func:`tiny_spec` model at ``path``. Its weights are multiplied by
    ``scale`` so that its classes are unbalanced and labels vary across a raster."""
    torch.manual_seed(seed)
    spec = tiny_spec(**kw)
    net = build_model(spec)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return save_model(net, spec, path)
