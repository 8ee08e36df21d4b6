"""Microscopy inputs: TIFF, BigTIFF, OME-TIFF, zarr and OME-Zarr (NGFF) read lazily as (band, y, x).

tileseg segments 2D images with optional channels. Axes come from the file: tifffile's
series axes for TIFF (``'YX'``, ``'CYX'``, ``'YXS'`` for RGB, ``'TCZYX'`` for OME-TIFF),
the NGFF ``multiscales`` axes for OME-Zarr (level 0 of the first multiscale image), and
``dimension_names`` / ``_ARRAY_DIMENSIONS`` or the rank (2: YX, 3: CYX) for a plain
zarr array. Any axis other than Y, X and one channel axis (C, or S for RGB samples) must
have length 1: a Z stack or a time series is refused, naming the axis. ``axes`` overrides
what the file says (e.g. ``'CYX'`` for a multi-page TIFF without metadata).

Channel names come from OME-XML (``Channel/@Name``), the NGFF ``omero.channels[].label``,
or a ``band_names`` attribute (a tileseg store's ``image``); otherwise ``ch0``, ``ch1``, ...

The physical pixel size (y, x) in micrometres comes from OME-XML
(``PhysicalSizeY/X`` with ``PhysicalSizeY/XUnit``; the OME schema's default unit is µm),
ImageJ metadata (``unit`` with the resolution tags), or the NGFF ``scale`` transforms of
level 0 (times any multiscale-level ``scale``) with the axes' ``unit``. It is None when
the file does not say (plain TIFFs carry DPI for printing, which is ignored).

Nothing is read until the Dask array is computed: each Dask task opens the file and
reads only the TIFF tiles / strips or zarr chunks under its block, so the image can be far
larger than memory, and the graph pickles to ``distributed`` workers (it holds paths, not
open file handles). Read tiled TIFFs for speed: in a strip TIFF every block reads whole
rows of strips.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np

from pipeline.errors import InputError, RasterIOError

log = logging.getLogger("tileseg")

#: Axes that may hold channels (tifffile letters): C (channel), S (sample, e.g. RGB).
CHANNEL_AXES = "CS"

#: Length units -> micrometres. OME-XML uses symbols (``UnitsLength``), NGFF uses UDUNITS-2
#: names (``micrometer``); ImageJ writes ``micron`` or ``\\u00B5m``.
UNIT_TO_UM: dict[str, float] = {
    "pm": 1e-6, "picometer": 1e-6,
    "Å": 1e-4, "angstrom": 1e-4,
    "nm": 1e-3, "nanometer": 1e-3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micrometer": 1.0, "micron": 1.0, "microns": 1.0, "\\u00B5m": 1.0,
    "mm": 1e3, "millimeter": 1e3,
    "cm": 1e4, "centimeter": 1e4,
    "dm": 1e5, "decimeter": 1e5,
    "m": 1e6, "meter": 1e6,
    "in": 25_400.0, "inch": 25_400.0,
}  # fmt: skip

_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")

#: GeoKeyDirectory, ModelPixelScale, ModelTiepoint, ModelTransformation: a GeoTIFF for rasterio.
_GEOTIFF_TAGS = (34735, 33550, 33922, 34264)

Kind = Literal["tiff", "ome-tiff", "imagej-tiff", "zarr", "ome-zarr"]


@dataclass(frozen=True)
class MicroscopyInfo:
    """What :func:`describe_microscopy` found in a microscopy file.

    Attributes:
        path: the file (TIFF) or the zarr store / group directory.
        kind: ``tiff``, ``ome-tiff``, ``imagej-tiff``, ``zarr`` or ``ome-zarr``.
        axes: axes of the stored array, one tifffile letter each (``'YX'``, ``'CYX'``, ``'YXS'``,
            ``'TCZYX'``), after any override.
        source_shape: shape of the stored array, one entry per letter of ``axes``.
        shape: (band, y, x) as read by :func:`read_microscopy` with all channels.
        dtype: numpy dtype name.
        channel_names: one per band, unique.
        pixel_size_um: (y, x) physical pixel size in micrometres, or None when unknown.
        bigtiff: the TIFF is a BigTIFF (False for zarr).
        component: for zarr, the path of the level-0 array inside ``path`` ('' for the root).
        series: for TIFF, the tifffile series index read (0).
        channel_axis: position in ``axes`` of the axis read as bands (C or S), or None (one band).
        nodata: the TIFF's nodata value (GDAL's tag 42113, ``GDAL_NODATA``), or None.
    """

    path: Path
    kind: Kind
    axes: str
    source_shape: tuple[int, ...]
    shape: tuple[int, int, int]
    dtype: str
    channel_names: list[str]
    pixel_size_um: tuple[float, float] | None
    bigtiff: bool = False
    component: str = ""
    series: int = 0
    channel_axis: int | None = None
    nodata: float | None = None


# --------------------------------------------------------------------------- helpers
def _to_um(value: Any, unit: str | None, default_unit: str | None) -> float | None:
    """A length in micrometres, or None when the value or its unit is missing or unknown."""
    unit = unit or default_unit
    if value is None or unit is None:
        return None
    factor = UNIT_TO_UM.get(str(unit).strip()) or UNIT_TO_UM.get(str(unit).strip().lower())
    if factor is None:
        log.warning("unknown length unit %r; the pixel size is taken as unknown", unit)
        return None
    try:
        size = float(value) * factor
    except (TypeError, ValueError):
        return None
    return size if size > 0 and np.isfinite(size) else None


def _pair(y: float | None, x: float | None) -> tuple[float, float] | None:
    """(y, x) when both are known; a single known size is used for both (square pixels)."""
    if y is None and x is None:
        return None
    return (y if y is not None else x, x if x is not None else y)  # type: ignore[return-value]


def _unique_names(names: list[str | None], n: int) -> list[str]:
    """``n`` unique channel names: given names, ``ch{i}`` where missing, ``_i`` on duplicates."""
    out: list[str] = []
    for i in range(n):
        name = names[i] if i < len(names) and names[i] else f"ch{i}"
        out.append(f"{name}_{i}" if name in out else str(name))
    return out


def _check_axes(path: Path, axes: str, shape: tuple[int, ...]) -> int | None:
    """Position of the channel axis in ``axes`` (None when there is none).

    Raises:
        InputError: Y or X missing, more than one channel axis longer than 1, or another axis
            (Z, T, ...) longer than 1.
    """
    if len(axes) != len(shape):
        raise InputError(f"{path}: axes {axes!r} do not match the array's {len(shape)} dimensions {shape}")
    if len(set(axes)) != len(axes) or "Y" not in axes or "X" not in axes:
        raise InputError(f"{path}: axes {axes!r} must name Y and X once each (e.g. 'YX', 'CYX', 'YXS')")
    for ax, n in zip(axes, shape, strict=True):
        if ax not in "YX" + CHANNEL_AXES and n > 1:
            what = {"Z": "planes (a Z stack)", "T": "time points"}.get(ax, "entries")
            raise InputError(
                f"{path}: axis {ax} has {n} {what}; tileseg reads 2D images with channels only. "
                "Extract or project one 2D image first"
                + ("" if ax in "ZT" else ", or pass axes (e.g. 'CYX') if this axis holds channels")
            )
    channel = [i for i, ax in enumerate(axes) if ax in CHANNEL_AXES and shape[i] > 1]
    if len(channel) > 1:
        raise InputError(f"{path}: axes {axes!r} have two channel axes longer than 1 {shape}; split the channels first")
    if channel:
        return channel[0]
    present = [i for i, ax in enumerate(axes) if ax in CHANNEL_AXES]
    return present[0] if present else None


def _override(path: Path, axes: str | None, stored: str, shape: tuple[int, ...]) -> str:
    if axes is None:
        return stored
    axes = axes.upper()
    if len(axes) != len(shape):
        raise InputError(f"{path}: axes {axes!r} has {len(axes)} letters but the array has shape {shape}")
    return axes


# --------------------------------------------------------------------------- TIFF
def _ome_image(xml: str, series: int) -> dict[str, Any]:
    """The OME-XML ``Image`` element of a series, as tifffile's ``xml2dict`` gives it ({} if absent)."""
    import tifffile

    try:
        images = tifffile.xml2dict(xml).get("OME", {}).get("Image", [])
    except Exception:  # malformed OME-XML: treat as absent
        return {}
    images = images if isinstance(images, list) else [images]
    return images[series] if series < len(images) else {}


def _gdal_nodata(text: Any) -> float | None:
    """The value of a ``GDAL_NODATA`` tag (ASCII, for example ``'65535'`` or ``'nan'``), or None."""
    try:
        return None if text is None else float(str(text).strip("\x00 "))
    except ValueError:
        return None


def _describe_tiff(path: Path, axes: str | None) -> MicroscopyInfo:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError(f"{path}: the TIFF holds no image")
            series = tif.series[0]
            if len(tif.series) > 1:
                log.info("%s holds %d image series; reading the first", path, len(tif.series))
            shape = tuple(int(n) for n in series.shape)
            stored_axes = series.axes
            dtype = np.dtype(series.dtype).name
            names: list[str | None] = []
            pixel: tuple[float, float] | None = None
            kind: Kind = "tiff"
            if tif.is_ome and tif.ome_metadata:
                kind = "ome-tiff"
                pixels = _ome_image(tif.ome_metadata, 0).get("Pixels", {})
                channels = pixels.get("Channel", [])
                channels = channels if isinstance(channels, list) else [channels]
                names = [c.get("Name") for c in channels if isinstance(c, dict)]
                # OME schema: PhysicalSize*Unit defaults to µm
                pixel = _pair(
                    _to_um(pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeYUnit"), "µm"),
                    _to_um(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit"), "µm"),
                )
            elif tif.is_imagej and tif.imagej_metadata:
                kind = "imagej-tiff"
                meta = tif.imagej_metadata
                labels = meta.get("Labels")
                names = list(labels) if isinstance(labels, list | tuple) else []
                unit = meta.get("unit")
                xres, yres = tif.pages.first.resolution  # pixels per `unit`, (x, y) order
                if unit and xres and yres:
                    pixel = _pair(_to_um(1.0 / yres, unit, None), _to_um(1.0 / xres, unit, None))
            bigtiff = bool(tif.is_bigtiff)
            nodata = _gdal_nodata(tif.pages.first.tags.valueof(42113))
    except tifffile.TiffFileError as exc:
        raise RasterIOError(f"{path} is not a readable TIFF: {exc}") from None
    except OSError as exc:
        raise RasterIOError(f"cannot read {path}: {exc}") from None
    axes = _override(path, axes, stored_axes, shape)
    ch = _check_axes(path, axes, shape)
    nb = shape[ch] if ch is not None else 1
    if not names and ch is not None and axes[ch] == "S" and nb == 3:
        names = ["R", "G", "B"]  # interleaved samples of an RGB TIFF
    return MicroscopyInfo(
        path=path, kind=kind, axes=axes, source_shape=shape,
        shape=(nb, shape[axes.index("Y")], shape[axes.index("X")]), dtype=dtype,
        channel_names=_unique_names(names, nb), pixel_size_um=pixel, bigtiff=bigtiff, series=0, channel_axis=ch,
        nodata=nodata,
    )  # fmt: skip


class _TiffArray:
    """A picklable, lazily opened view of level 0 of one TIFF series, sliced like a numpy array.

    Every ``__getitem__`` opens the file and reads through tifffile's zarr store (only the
    tiles or strips under the slice), so no file handle crosses process boundaries.
    """

    def __init__(self, path: Path, series: int, shape: tuple[int, ...], dtype: str) -> None:
        self.path, self.series, self.shape, self.dtype = str(path), series, shape, np.dtype(dtype)
        self.ndim = len(shape)
        st = os.stat(path)
        self._stamp = (st.st_size, st.st_mtime_ns)

    def __dask_tokenize__(self) -> tuple:
        return ("tileseg-tiff", self.path, self.series, self._stamp)

    def __getitem__(self, key: Any) -> np.ndarray:
        import tifffile
        import zarr

        try:
            with tifffile.TiffFile(self.path) as tif, tif.series[self.series].aszarr(level=0) as store:
                return np.asarray(zarr.open_array(store, mode="r")[key])
        except Exception as exc:  # tifffile, zarr and codecs raise many types
            raise RasterIOError(f"cannot read {key} from {self.path}: {exc}") from None


# --------------------------------------------------------------------------- zarr
def _ome_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """NGFF metadata of a group: under ``ome`` (NGFF 0.5, zarr v3) or at the top (0.4 and earlier)."""
    return dict(attrs.get("ome", attrs))


def _scale_of(transforms: list[dict[str, Any]] | None, ndim: int) -> list[float]:
    for t in transforms or []:
        if t.get("type") == "scale" and len(t.get("scale", [])) == ndim:
            return [float(v) for v in t["scale"]]
    return [1.0] * ndim


def _describe_zarr(path: Path, axes: str | None) -> MicroscopyInfo:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises many types for a path that is not a store
        raise RasterIOError(f"{path} is not a readable zarr array or group: {exc}") from None
    names: list[str | None] = []
    pixel: tuple[float, float] | None = None
    component = ""
    if isinstance(node, zarr.Group):
        meta = _ome_attrs(dict(node.attrs))
        multiscales = meta.get("multiscales")
        if not multiscales:
            arrays = sorted(k for k, _ in node.arrays())
            raise InputError(
                f"{path} is a zarr group without NGFF 'multiscales' metadata; give the path of one array "
                f"inside it (arrays here: {arrays or 'none'})"
            )
        ms = multiscales[0]
        component = str(ms["datasets"][0]["path"])
        try:
            arr = node[component]
        except KeyError:
            raise InputError(f"{path}: the NGFF level-0 dataset {component!r} is missing") from None
        ngff_axes = ms.get("axes") or ["t", "c", "z", "y", "x"][-arr.ndim :]  # NGFF 0.1/0.2 are 5D tczyx
        ngff_axes = [a if isinstance(a, dict) else {"name": a} for a in ngff_axes]
        letters = "".join("C" if a.get("type") == "channel" else str(a["name"])[:1].upper() for a in ngff_axes)
        scale = np.multiply(_scale_of(ms["datasets"][0].get("coordinateTransformations"), arr.ndim),
                            _scale_of(ms.get("coordinateTransformations"), arr.ndim))  # fmt: skip
        if "Y" in letters and "X" in letters:
            iy, ix = letters.index("Y"), letters.index("X")
            if ngff_axes[iy].get("unit") or ngff_axes[ix].get("unit"):
                pixel = _pair(_to_um(scale[iy], ngff_axes[iy].get("unit"), None),
                              _to_um(scale[ix], ngff_axes[ix].get("unit"), None))  # fmt: skip
        channels = (meta.get("omero") or {}).get("channels") or []
        names = [c.get("label") for c in channels if isinstance(c, dict)]
        kind: Kind = "ome-zarr"
    else:
        arr = node
        attrs = dict(arr.attrs)
        dims = getattr(arr.metadata, "dimension_names", None) or attrs.get("_ARRAY_DIMENSIONS")
        if dims and all(dims):
            letters = "".join("C" if str(d).lower() in ("c", "band", "channel") else str(d)[:1].upper() for d in dims)
        else:
            letters = {2: "YX", 3: "CYX"}.get(arr.ndim, "Q" * arr.ndim)
        names = list(attrs.get("band_names") or [])
        kind = "zarr"
    shape = tuple(int(n) for n in arr.shape)
    axes = _override(path, axes, letters, shape)
    ch = _check_axes(path, axes, shape)
    nb = shape[ch] if ch is not None else 1
    return MicroscopyInfo(
        path=path, kind=kind, axes=axes, source_shape=shape,
        shape=(nb, shape[axes.index("Y")], shape[axes.index("X")]), dtype=np.dtype(arr.dtype).name,
        channel_names=_unique_names(names, nb), pixel_size_um=pixel, component=component, channel_axis=ch,
    )  # fmt: skip


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("zarr.json", ".zarray", ".zgroup"))


# --------------------------------------------------------------------------- public API
def is_microscopy(path: str | Path) -> bool:
    """True for inputs this module reads and GDAL rasters should not: a zarr store or array,
    or a TIFF without GeoTIFF tags (OME-TIFF, ImageJ or plain). A GeoTIFF gives False."""
    p = Path(path)
    if _is_zarr(p):
        return True
    if not (p.is_file() and p.name.lower().endswith(_TIFF_SUFFIXES)):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            tags = tif.pages.first.tags
            return not any(code in tags for code in _GEOTIFF_TAGS)
    except (tifffile.TiffFileError, OSError):
        return False


def describe_microscopy(path: str | Path, axes: str | None = None) -> MicroscopyInfo:
    """Shape, dtype, axes, channel names and pixel size of a microscopy image, without reading pixels.

    Args:
        path: a TIFF / BigTIFF / OME-TIFF file, a zarr array, or an OME-Zarr image group.
        axes: override of the stored axes, one tifffile letter per dimension (e.g. ``'CYX'``).

    Returns:
        a :class:`MicroscopyInfo`; its ``shape`` is (band, y, x).

    Raises:
        RasterIOError: missing or unreadable file.
        InputError: not a 2D image with channels (e.g. Z or T longer than 1, named in the message),
            or a zarr group without NGFF metadata.
    """
    p = Path(path)
    if not p.exists():
        raise RasterIOError(f"microscopy input not found: {p}")
    if _is_zarr(p):
        return _describe_zarr(p, axes)
    if p.is_file():
        return _describe_tiff(p, axes)
    raise RasterIOError(f"{p} is neither a TIFF file nor a zarr store")


def select_channels(info: MicroscopyInfo, channels: list[str | int] | None) -> list[int]:
    """Band indices for ``channels`` (names or 0-based indices, in the order given; None: all).

    Raises:
        InputError: an unknown name or an index out of range; the message lists the channels.
    """
    if channels is None:
        return list(range(info.shape[0]))
    available = ", ".join(f"{i}: {n}" for i, n in enumerate(info.channel_names))
    out = []
    for c in channels:
        if isinstance(c, bool):  # bool is an int subclass; True is not a channel
            raise InputError(f"channel {c!r} is neither a name nor an index; channels of {info.path}: {available}")
        if isinstance(c, int | np.integer):
            if not 0 <= int(c) < info.shape[0]:
                raise InputError(f"channel index {c} is out of range; channels of {info.path}: {available}")
            out.append(int(c))
        elif c in info.channel_names:
            out.append(info.channel_names.index(c))
        else:
            raise InputError(f"unknown channel {c!r}; channels of {info.path}: {available}")
    if not out:
        raise InputError(f"no channel selected; channels of {info.path}: {available}")
    return out


def read_microscopy(
    source: str | Path | MicroscopyInfo,
    channels: list[str | int] | None = None,
    chunk: int = 512,
    axes: str | None = None,
) -> da.Array:
    """Lazy image (band, y, x) of a microscopy input, Dask-chunked (all bands, chunk, chunk).

    Only the blocks computed are read (see the module docstring). Channel order follows
    ``channels``; the dtype is the file's.

    Args:
        source: a path (described with :func:`describe_microscopy`) or its info.
        channels: names or 0-based indices (None: all channels).
        chunk: Dask chunk edge in pixels.
        axes: axes override when ``source`` is a path.

    Raises:
        RasterIOError, InputError: as :func:`describe_microscopy` and :func:`select_channels`.
    """
    info = source if isinstance(source, MicroscopyInfo) else describe_microscopy(source, axes)
    idx = select_channels(info, channels)
    ch = info.channel_axis
    planar = ch is not None and info.axes[ch] != "S"  # interleaved samples share one TIFF tile
    chunks = tuple(
        chunk if ax in "YX" else (1 if planar else n) if i == ch else 1
        for i, (ax, n) in enumerate(zip(info.axes, info.source_shape, strict=True))
    )
    if info.kind in ("zarr", "ome-zarr"):
        url = str(info.path / info.component) if info.component else str(info.path)
        arr = da.from_zarr(url, chunks=chunks)
    else:
        proxy = _TiffArray(info.path, info.series, info.source_shape, info.dtype)
        arr = da.from_array(proxy, chunks=chunks, meta=np.empty((0,) * proxy.ndim, dtype=info.dtype))
    keep = [i for i, ax in enumerate(info.axes) if ax in "YX" or i == ch]
    arr = arr[tuple(slice(None) if i in keep else 0 for i in range(arr.ndim))]
    kept_axes = "".join(info.axes[i] for i in keep)
    if ch is None:
        arr = arr[None]
        kept_axes = "C" + kept_axes
    order = [kept_axes.index(a) for a in (info.axes[ch] if ch is not None else "C", "Y", "X")]
    arr = arr.transpose(order)[idx]
    return arr.rechunk((len(idx), chunk, chunk))
