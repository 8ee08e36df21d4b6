"""U-Net (segmentation-models-pytorch), FCN and Mask R-CNN (torchvision) models: build, save, load, predict.

A saved model is two files side by side:

- ``NAME.safetensors``: the weights (safetensors; loading never unpickles);
- ``NAME.json``: the sidecar :class:`ModelSpec`: architecture and encoder, input band
  names and order, per-band normalisation (mean/std in the input's units), class names
  (id = position), the tile size and halo used in training, and the tileseg version.

Models run on (N, C, H, W) float32 batches normalised with the sidecar's statistics and
return per-class probabilities (softmax over C, never raw logits). One model instance
is cached per process and device (:func:`cached_model`), so a Dask worker loads it once,
not once per task.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError, InputError, MissingFileError
from pipeline.nodata import is_nan, missing

#: resnet layers that an encoder of depth d < 5 never runs (smp keeps them; we drop them)
_RESNET_STAGES = {4: ("layer4",), 3: ("layer3", "layer4"), 2: ("layer2", "layer3", "layer4"),
                  1: ("layer1", "layer2", "layer3", "layer4")}  # fmt: skip


class ModelSpec(BaseModel):
    """Everything needed to rebuild and apply a saved model (the JSON sidecar)."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(description="smp architecture name (Unet, UnetPlusPlus, FPN, ...), 'fcn_resnet50' or 'maskrcnn'.")
    encoder: str = Field(default="resnet18", description="smp encoder, or the ResNet backbone of a Mask R-CNN.")
    encoder_depth: int = Field(default=5, ge=1, le=5)
    decoder_channels: list[int] | None = None
    bands: list[str] = Field(description="Input band names, in the order the model expects.")
    mean: list[float] = Field(description="Per-band mean of the training pixels, input units.")
    std: list[float] = Field(description="Per-band standard deviation of the training pixels, input units.")
    classes: list[str] = Field(description="Class names; output channel i is class id i.")
    tile_size: int = Field(description="Training chip edge, pixels.")
    halo: int = Field(default=0, description="Halo (pixels) recommended around each inference window.")
    target: Literal["semantic", "instance_boundary", "instances"] = Field(
        default="semantic",
        description="What the outputs mean: class probabilities ('semantic'), background/interior/boundary "
        "probabilities for the watershed step ('instance_boundary'), or Mask R-CNN detections ('instances').",
    )
    anchor_sizes: list[int] | None = Field(
        default=None, description="Mask R-CNN only: anchor edge (px) per FPN level; None = tileseg's default."
    )
    tileseg_version: str = ""
    save_id: str | None = Field(
        default=None, description="Random id of one save, also in the weights' metadata: a pair from two saves is refused."
    )
    trained: dict[str, Any] = Field(default_factory=dict, description="Provenance: config, epochs, scores.")

    @property
    def divisor(self) -> int:
        """Window edges must be multiples of this (the encoder's total downsampling)."""
        return {"fcn_resnet50": 8, "maskrcnn": 32}.get(self.arch, 2**self.encoder_depth)


def build_model(spec: ModelSpec, encoder_weights: str | None = None):
    """Build the torch module described by ``spec`` (weights random, or ``encoder_weights``).

    ``encoder_weights`` other than None needs internet (smp downloads them); tileseg
    never does that by default.

    Raises:
        InputError: unknown architecture or encoder.
    """
    n_in, n_out = len(spec.bands), len(spec.classes)
    if spec.arch == "maskrcnn":
        from pipeline.segment.maskrcnn import build_maskrcnn

        return build_maskrcnn(spec)
    if spec.arch == "fcn_resnet50":
        from torchvision.models.segmentation import fcn_resnet50

        net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=n_out, aux_loss=False)
        net.backbone.conv1 = nn.Conv2d(n_in, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return FCNWrapper(net)
    import segmentation_models_pytorch as smp

    kwargs: dict[str, Any] = {
        "encoder_name": spec.encoder,
        "encoder_weights": encoder_weights,
        "in_channels": n_in,
        "classes": n_out,
        "encoder_depth": spec.encoder_depth,
    }
    if spec.decoder_channels is not None:
        kwargs["decoder_channels"] = tuple(spec.decoder_channels)
    try:
        net = smp.create_model(spec.arch, **kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"cannot build {spec.arch} with encoder {spec.encoder}: {exc}") from None
    if spec.encoder.startswith("resnet") and spec.encoder_depth in _RESNET_STAGES:
        for name in _RESNET_STAGES[spec.encoder_depth]:  # never run at this depth: keep checkpoints small
            if hasattr(net.encoder, name):
                delattr(net.encoder, name)
    return net


class FCNWrapper(nn.Module):
    """torchvision's FCN returns ``{"out": logits}``; this returns the logits tensor like smp models."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)["out"]


def save_model(net, spec: ModelSpec, path: str | Path) -> Path:
    """Save weights as ``path`` (.safetensors) and the sidecar next to it (.json).

    Both are written under hidden temporary names and renamed into place, the weights
    first: an interrupted save leaves the previous model whole, or at worst new weights next
    to the old sidecar, which :func:`load_model` refuses (both carry the same ``save_id``).
    The files get the usual permissions (``0o666`` less the umask, as ``open`` gives), not
    safetensors' owner-only ``0o600``: Dask workers may run as another user.
    """
    import uuid

    from safetensors.torch import save_file

    from pipeline.io.files import tmp_sibling

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = spec.model_copy(update={"save_id": uuid.uuid4().hex})
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    sidecar = path.with_suffix(".json")
    tmp_w, tmp_s = tmp_sibling(path), tmp_sibling(sidecar)
    try:
        save_file(state, str(tmp_w), metadata={"format": "pt", "tileseg": "model", "tileseg_save": spec.save_id})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_w, 0o666 & ~umask)
        tmp_s.write_text(spec.model_dump_json(indent=2) + "\n")
        os.replace(tmp_w, path)
        os.replace(tmp_s, sidecar)
    finally:
        tmp_w.unlink(missing_ok=True)
        tmp_s.unlink(missing_ok=True)
    return path


def load_spec(path: str | Path) -> ModelSpec:
    """Read the JSON sidecar of a model.

    Raises:
        MissingFileError (a RasterIOError): missing sidecar or weights; InputError: invalid sidecar.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".ckpt", ".pkl", ".bin"):
        raise InputError(
            f"{path}: tileseg loads only safetensors checkpoints (NAME.safetensors + NAME.json); pickled "
            "checkpoints (.pt, .pth, .ckpt) are refused because loading them can run code"
        )
    if suffix not in (".safetensors", ".json", ""):
        raise InputError(f"{path} is not a model: a model is NAME.safetensors with NAME.json beside it")
    weights, sidecar = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for p in (weights, sidecar):
        if not p.is_file():
            raise MissingFileError(f"model file not found: {p} (a model is NAME.safetensors + NAME.json)")
    try:
        return ModelSpec.model_validate_json(sidecar.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "file"
        raise InputError(f"{sidecar} is not a valid tileseg model sidecar ({where}: {first['msg']})") from None


def load_model(path: str | Path, device: str = "cpu"):
    """Load ``(module, spec)``: weights with safetensors (no pickle), module in eval mode on ``device``.

    Raises:
        MissingFileError (a RasterIOError): missing files; InputError: weights that do not fit the sidecar, or a
            file that is not safetensors (a pickle is refused, never executed).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    spec = load_spec(path)
    weights = Path(path).with_suffix(".safetensors")
    try:
        state = load_file(str(weights), device="cpu")
        with safe_open(str(weights), framework="pt") as f:
            saved = (f.metadata() or {}).get("tileseg_save")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{weights} is not a safetensors file ({exc}); refusing to load it") from None
    if spec.save_id is not None and saved != spec.save_id:
        raise InputError(f"{weights} and its sidecar come from two different saves (an interrupted save?); "
                         "train again, or restore both files")  # fmt: skip
    net = build_model(spec)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{weights} does not match its sidecar ({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    return net.to(device).eval(), spec


def check_bands(spec: ModelSpec, band_names: list[str]) -> list[int]:
    """Indices of the model's input bands in ``band_names``, in the model's order.

    Raises:
        InputError: naming the bands the raster lacks.
    """
    missing = [b for b in spec.bands if b not in band_names]
    if missing:
        raise InputError(f"the model needs bands {missing} that the raster lacks (raster bands: {band_names})")
    return [band_names.index(b) for b in spec.bands]


def resolve_device(device: Literal["auto", "cpu", "cuda"]) -> str:
    """'cuda' when asked or when ``auto`` finds a GPU, else 'cpu'.

    Raises:
        InputError: 'cuda' asked but no GPU is visible.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("segment.unet.device is 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    return device


_CACHE: dict[tuple[str, str, bool], tuple[Any, ModelSpec]] = {}
_LOCK = threading.Lock()


def cached_model(path: str | Path, device: str, compile: bool = False):
    """The process-wide instance of a model on a device, loaded on first use, in the
    channels_last memory format (NHWC): oneDNN's and cuDNN's fast convolution layout (on
    this project's 2-core CPU a batch of the sample model ran 1.45 times faster than in NCHW,
    with logits within 1e-5; README "Performance").

    With ``compile``, the model is wrapped in ``torch.compile`` (TorchInductor). The wrapper
    compiles on its first call, for that batch shape (:func:`pipeline.blend.window_sums`
    always passes full batches, so one shape); concurrent first calls from several Dask
    threads wait on Dynamo's compile lock. On the sample model a batch of 8 windows of 256 px
    ran 1.38 times faster on one CPU thread (516 -> 375 ms), logits within 1e-5; compiling
    took about 25 s on this project's 2-core CPU (README "Performance"). The generated
    kernels follow the calling thread's torch thread count, as the eager model does.
    """
    key = (str(Path(path).resolve()), device, bool(compile))
    with _LOCK:
        if key not in _CACHE:
            net, spec = load_model(path, device)
            net = net.to(memory_format=torch.channels_last)
            _CACHE[key] = (torch.compile(net) if compile else net, spec)
        return _CACHE[key]


def warm_model(path: str | Path, device: str, compile: bool, batch_size: int, window: int) -> float:
    """Load the model into this process's cache (:func:`cached_model`) and run one batch of
    zeros, (``batch_size``, bands, ``window``, ``window``), through it: with ``compile``, that
    call compiles it. For benchmarks, which keep one-off costs out of the clock.

    Returns:
        Seconds taken.
    """
    import time

    t0 = time.perf_counter()
    net, spec = cached_model(path, device, compile)
    predict_probabilities(net, np.zeros((batch_size, len(spec.bands), window, window), np.float32), device)
    return time.perf_counter() - t0


def predict_probabilities(net, batch: np.ndarray, device: str, as_tensor: bool = False, *,
                          spec: ModelSpec | None = None, valid: np.ndarray | None = None,
                          nodata: float | None = None) -> Any:  # fmt: skip
    """Softmax probabilities of a batch.

    The batch goes to the model in channels_last layout (see :func:`cached_model`); on CUDA
    under bf16 autocast. With ``spec``, the batch is in the raster's units and is normalised
    here, on ``device``, as :func:`normalise` does and with the same float32 operations in
    the same order, so the values are identical: on a GPU the host then only converts the
    batch to float32, one pass instead of four (a batch of 16 windows of 512 px and 10 bands
    is 42 M values; :func:`normalise` takes about 17 ms per 5 M on one CPU thread).

    Args:
        batch: (N, C, H, W): float32 already normalised, or (with ``spec``) any real dtype in
            the raster's units.
        device: 'cpu' or 'cuda'.
        as_tensor: return the torch tensor on ``device`` (for sums made there, such as
            :func:`pipeline.blend.window_sums` on a GPU) instead of a numpy array.
        spec: normalise with its per-band ``mean`` and ``std``.
        valid: (N, H, W) bool, with ``spec``: pixels where it is False are set to 0 (the
            band mean). With ``spec``, non-finite values (NaN) of a float batch are set to 0
            as well: a NaN would spread through the convolutions to the neighbours.
        nodata: with ``spec``, values equal to it (one band missing at a pixel whose other
            bands are valid) are set to 0, the band mean, like non-finite values: as a
            number (say -9999) it would reach the model and sway the neighbours' classes.

    Returns:
        float32 (N, K, H, W), summing to 1 over K: numpy, or a torch tensor with ``as_tensor``.

    Raises:
        ConfigError: a compiled model (``segment.unet.compile``) failed to compile, for
            example no working C++ compiler on a CPU.
    """
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    if spec is not None:
        if x.data_ptr() == batch.__array_interface__["data"][0]:
            x = x.clone(memory_format=torch.channels_last)  # never change the caller's array
        band_missing = None if nodata is None or is_nan(nodata) else x == float(nodata)
        x.sub_(torch.tensor(spec.mean, dtype=torch.float32, device=device)[None, :, None, None])
        x.div_(torch.tensor(spec.std, dtype=torch.float32, device=device)[None, :, None, None])
        if batch.dtype.kind == "f":  # NaN (or inf) of one band of a valid pixel: the band mean
            x.masked_fill_(~torch.isfinite(x), 0.0)
        if band_missing is not None:  # the nodata value of one band of a valid pixel: the same
            x.masked_fill_(band_missing, 0.0)
        if valid is not None:
            x.mul_(torch.from_numpy(np.ascontiguousarray(valid)).to(device)[:, None])
    try:
        with torch.inference_mode():
            if device == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = net(x)
            else:
                logits = net(x)
            probs = torch.softmax(logits.float(), dim=1).contiguous()
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        failure = ConfigError(f"torch.compile failed on {device} ({first}); set compile: false")
    else:
        return probs if as_tensor else probs.cpu().numpy()
    raise failure  # outside `except`: one line, no chained torch traceback


def normalise(batch: np.ndarray, spec: ModelSpec, valid: np.ndarray | None = None,
              nodata: float | None = None) -> np.ndarray:
    """(N, C, H, W) input units -> float32 ``(x - mean) / std`` per band; pixels where
    ``valid`` (N, H, W) is False, and missing values of one band (:func:`pipeline.nodata.missing`:
    ``nodata``, or not finite), are set to 0 (the band mean)."""
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    out = (batch.astype(np.float32) - mean) / std
    if nodata is not None or batch.dtype.kind == "f":  # one band missing at a valid pixel: the band mean
        out[missing(batch, nodata)] = 0.0
    if valid is not None:
        out *= valid[:, None, :, :]
    return out


def describe(spec: ModelSpec) -> str:
    """One line naming the model, for logs."""
    return f"{spec.arch}/{spec.encoder} depth {spec.encoder_depth}, bands {spec.bands}, classes {spec.classes}"
