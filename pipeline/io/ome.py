"""Microscopy outputs: OME-Zarr (NGFF) image + labels pyramids, and tiled label TIFFs.

Both writers take Dask arrays and write them block by block, so images larger than
memory never sit in memory whole, and both publish atomically: the output is written
under a hidden temporary name next to ``out`` and renamed onto it when complete.

OME-Zarr layout (NGFF 0.5, zarr v3: what ome-zarr-py 0.18 writes; the metadata is written
with ome-zarr-py's own ``write_multiscales_metadata`` / ``write_label_metadata``)::

    out.zarr/                 multiscales "image", axes c, y, x; omero channel labels
      0/ 1/ 2/ ...            (c, y, x) levels, each half the size of the one before
      labels/                 {"labels": [name]}
        <name>/               multiscales + image-label {colors, source: ../../}
          0/ 1/ 2/ ...        (y, x) integer ids

Level k has ``ceil(n / 2**k)`` pixels along y and x (per level: ``ceil(n / 2)``). Images
are reduced by the mean of 2 x 2 blocks (the last row / column is repeated when a size
is odd; integers are rounded); labels by taking the top-left pixel of each 2 x 2 block,
a nearest-neighbour choice (the four pixels are equally near the block centre) that
never mixes ids. Both have the same NGFF transforms, level k: ``scale = s * 2**k`` and
``translation = s * (2**k - 1) / 2`` on y and x, where s is the pixel size in
micrometres (unit ``micrometer``) or 1 without a unit when the pixel size is unknown;
the translation puts a level-k pixel centre on the centre of the 2**k x 2**k block it
summarises (the convention ome-zarr-py's ``generate_coordinate_transformations`` uses).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from pipeline.errors import InputError, RasterIOError
from pipeline.io.files import remove_stale_temporaries

#: Uncompressed size from which a TIFF is written as BigTIFF (tifffile's own threshold).
BIGTIFF_FROM = 2**32 - 2**25


def n_levels(height: int, width: int, tile: int) -> int:
    """Pyramid levels so that the last one fits in one ``tile`` x ``tile`` chunk (at least 1)."""
    levels, h, w = 1, height, width
    while max(h, w) > tile:
        h, w, levels = math.ceil(h / 2), math.ceil(w / 2), levels + 1
    return levels


def _mean_2x2(image: da.Array) -> da.Array:
    """(c, y, x) -> (c, ceil(y/2), ceil(x/2)): mean of 2 x 2 blocks, odd edges repeated, same dtype."""
    _, h, w = image.shape
    padded = da.pad(image, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    padded = padded.rechunk((-1,) + tuple(2 * math.ceil(c[0] / 2) for c in padded.chunks[1:]))
    mean = da.coarsen(np.mean, padded.astype(np.float64), {1: 2, 2: 2})
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        mean = da.clip(da.rint(mean), info.min, info.max)
    return mean.astype(image.dtype)


def _write_level(group: Any, path: str, arr: da.Array, chunks: tuple[int, ...], dims: tuple[str, ...],
                 label: str, progress: bool) -> da.Array:  # fmt: skip
    """Write one pyramid level as a zarr array ``group/path`` with storage chunks ``chunks``
    (Dask chunks rechunked to match, so each task writes whole chunks of its own); return it
    read back lazily, as the source of the next level."""
    from pipeline.cluster import compute

    target = group.create_array(path, shape=arr.shape, dtype=arr.dtype, chunks=chunks, dimension_names=dims,
                                fill_value=0)  # fmt: skip
    compute(da.store(arr.rechunk(chunks), target, lock=False, compute=False), label=label, progress=progress)
    return da.from_zarr(target)


def _transforms(levels: int, pixel: tuple[float, float], ndim: int) -> list[list[dict[str, Any]]]:
    out = []
    for k in range(levels):
        f = 2.0**k
        scale = [1.0] * (ndim - 2) + [pixel[0] * f, pixel[1] * f]
        shift = [0.0] * (ndim - 2) + [pixel[0] * (f - 1) / 2, pixel[1] * (f - 1) / 2]
        out.append([{"type": "scale", "scale": scale}, {"type": "translation", "translation": shift}])
    return out


def _axes(names: str, unit: str | None) -> list[dict[str, str]]:
    axes = []
    for n in names:
        ax = {"name": n, "type": "channel" if n == "c" else "space"}
        if n != "c" and unit:
            ax["unit"] = unit
        axes.append(ax)
    return axes


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (out / "zarr.json").is_file()):
        raise InputError(f"{out} exists and is not a zarr store; refusing to overwrite it (choose another path)")


def write_ome_zarr(
    out: str | Path,
    image: da.Array,
    channel_names: list[str],
    pixel_size_um: tuple[float, float] | None = None,
    labels: da.Array | None = None,
    label_name: str = "labels",
    label_colors: dict[int, tuple[int, int, int, int]] | None = None,
    chunk: int = 512,
    levels: int | None = None,
    progress: bool = True,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write an OME-Zarr (NGFF 0.5) image pyramid, and optionally a label pyramid, to ``out``.

    See the module docstring for the layout, the reductions and the transforms.

    Args:
        out: the ``.zarr`` directory to create (replaced if it is a zarr store).
        image: (c, y, x), any numeric dtype.
        channel_names: one per channel (the ``omero`` channel labels).
        pixel_size_um: (y, x) micrometres per pixel, or None (scales in pixels, no unit).
        labels: (y, x) integer ids, the same (y, x) shape as ``image``; 0 is background.
        label_name: the label image's name under ``labels/``.
        label_colors: id -> (r, g, b, a) 0-255, written as ``image-label.colors``.
        chunk: storage chunk edge (y, x) in pixels; image chunks hold all channels.
        levels: pyramid levels (default: until one chunk holds the whole level, see :func:`n_levels`).
        attrs: more root attributes (beside ``ome``), such as the run that wrote the store.

    Returns:
        ``out``.

    Raises:
        InputError: bad shapes, non-integer labels, wrong number of channel names, or ``out``
            is something other than a zarr store.
        RasterIOError: the store cannot be written.
    """
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    from pipeline.io.store import publish_dir

    out = Path(out)
    if image.ndim != 3:
        raise InputError(f"write_ome_zarr needs an image (c, y, x); got shape {image.shape}")
    c, h, w = image.shape
    if len(channel_names) != c:
        raise InputError(f"{len(channel_names)} channel names for {c} channels")
    if labels is not None:
        if labels.shape != (h, w):
            raise InputError(f"labels shape {labels.shape} differs from the image's (y, x) {(h, w)}")
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise InputError(f"labels must hold integer ids, not {labels.dtype}")
    _check_out(out)
    nlev = levels or n_levels(h, w, chunk)
    pixel = pixel_size_um or (1.0, 1.0)
    unit = "micrometer" if pixel_size_um is not None else None
    fmt = FormatV05()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        level = image
        for k in range(nlev):
            if k:
                level = _mean_2x2(level)
            level = _write_level(root, str(k), level, (c, chunk, chunk), ("c", "y", "x"),
                                 f"OME-Zarr image level {k} -> {out.name}", progress)  # fmt: skip
        datasets = [{"path": str(k), "coordinateTransformations": t}
                    for k, t in enumerate(_transforms(nlev, pixel, 3))]  # fmt: skip
        omero = {"channels": [{"label": str(n), "active": True} for n in channel_names]}
        extra = {"omero": omero, "method": "2x2 block mean (odd edges repeated)"}
        write_multiscales_metadata(root, datasets, fmt=fmt, axes=_axes("cyx", unit), name="image", metadata=extra)
        if attrs:
            root.attrs.update(attrs)
        if labels is not None:
            lab_root = root.create_group("labels")
            lab = lab_root.create_group(label_name)
            level = labels
            for k in range(nlev):
                if k:
                    level = level[::2, ::2]
                level = _write_level(lab, str(k), level, (chunk, chunk), ("y", "x"),
                                     f"OME-Zarr labels level {k} -> {out.name}", progress)  # fmt: skip
            datasets = [{"path": str(k), "coordinateTransformations": t}
                        for k, t in enumerate(_transforms(nlev, pixel, 2))]  # fmt: skip
            write_multiscales_metadata(lab, datasets, fmt=fmt, axes=_axes("yx", unit), name=label_name,
                                       metadata={"method": "nearest: top-left pixel of each 2x2 block"})  # fmt: skip
            colors = None
            if label_colors:
                colors = [{"label-value": int(v), "rgba": [int(x) for x in rgba]} for v, rgba in label_colors.items()]
            write_label_metadata(lab_root, label_name, colors=colors, fmt=fmt, source={"image": "../../"})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out)
    return out


# --------------------------------------------------------------------------- TIFF
def write_tiled_tiff(
    out: str | Path,
    shape: tuple[int, int],
    dtype: Any,
    tiles: Iterator[np.ndarray],
    tile: int = 256,
    compression: str = "zlib",
    bigtiff: bool | None = None,
    ome_metadata: dict[str, Any] | None = None,
    pixel_size_um: tuple[float, float] | None = None,
    tags: dict[str, str] | None = None,
) -> Path:
    """Write a single-plane tiled, compressed TIFF from an iterator of tiles; publish it atomically.

    Args:
        out: the file to write (replaced).
        shape: (y, x) in pixels.
        tiles: (tile, tile) arrays in row-major tile order (edge tiles zero-padded to full size).
        bigtiff: True / False, or None for BigTIFF when the uncompressed size reaches
            :data:`BIGTIFF_FROM` (a classic TIFF's offsets end at 4 GiB).
        ome_metadata: write an OME-TIFF with this OME-XML metadata (tifffile's ``metadata``:
            ``axes``, ``Channel``, ``PhysicalSizeX`` ...; a fixed ``UUID`` makes the file
            reproducible); None: a plain TIFF.
        pixel_size_um: (y, x), also written as TIFF resolution (pixels per centimetre).
        tags: metadata items, in GDAL's metadata TIFF tag (42112, ``GDAL_METADATA``), so that
            GDAL and rasterio read them as the file's tags.

    Raises:
        RasterIOError: the file cannot be written.
    """
    import tifffile

    out = Path(out)
    dtype = np.dtype(dtype)
    if bigtiff is None:
        bigtiff = shape[0] * shape[1] * dtype.itemsize >= BIGTIFF_FROM
    extra: dict[str, Any] = {}
    if pixel_size_um is not None:
        extra = {"resolution": (1e4 / pixel_size_um[1], 1e4 / pixel_size_um[0]), "resolutionunit": "CENTIMETER"}
    if tags:
        extra["extratags"] = [(GDAL_METADATA_TAG, "s", 0, gdal_metadata_xml(tags), True)]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tifffile.imwrite(
            tmp, tiles, shape=shape, dtype=dtype, tile=(tile, tile), compression=compression, bigtiff=bigtiff,
            photometric="minisblack", ome=ome_metadata is not None, metadata=ome_metadata, **extra,
        )  # fmt: skip
        os.replace(tmp, out)
    except (OSError, ValueError) as exc:
        raise RasterIOError(f"cannot write {out}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


#: TIFF tag in which GDAL keeps a dataset's metadata items (an XML document).
GDAL_METADATA_TAG = 42112


def gdal_metadata_xml(tags: dict[str, str]) -> str:
    """``<GDALMetadata>`` XML holding ``tags`` as items of the default domain: the form of
    GDAL's TIFF tag 42112 (GDAL GTiff driver documentation, "Metadata").

    Raises:
        ValueError: a value holds ``&``: GDAL 3.10 read ``a&amp;b`` back as ``a``.
    """
    from xml.sax.saxutils import escape, quoteattr

    if any("&" in str(v) for v in tags.values()):
        raise ValueError("GDAL metadata values written by tileseg cannot hold '&'")
    items = "".join(f"<Item name={quoteattr(str(k))}>{escape(str(v))}</Item>" for k, v in tags.items())
    return f"<GDALMetadata>{items}</GDALMetadata>"


def _dask_tiles(arr: da.Array, tile: int, progress: bool) -> Iterator[np.ndarray]:
    """(tile, tile) tiles of a (y, x) Dask array in row-major order, zero-padded at the edges.

    One band of rows (the Dask row-chunk height rounded up to a multiple of ``tile``) is
    computed at a time, in parallel over its chunks; memory holds one band.
    """
    from pipeline.cluster import compute

    h, w = arr.shape
    band = tile * max(1, math.ceil(arr.chunks[0][0] / tile))
    for r0 in range(0, h, band):
        (rows,) = compute(arr[r0 : r0 + band], label=f"label TIFF rows {r0}-{min(h, r0 + band)}", progress=progress)
        rows = np.asarray(rows)
        for t0 in range(0, rows.shape[0], tile):
            for c0 in range(0, w, tile):
                block = rows[t0 : t0 + tile, c0 : c0 + tile]
                if block.shape != (tile, tile):
                    block = np.pad(block, ((0, tile - block.shape[0]), (0, tile - block.shape[1])))
                yield block


def write_label_tiff(
    labels: da.Array,
    out: str | Path,
    tile: int = 256,
    compression: str = "zlib",
    bigtiff: bool | None = None,
    pixel_size_um: tuple[float, float] | None = None,
    progress: bool = False,
    tags: dict[str, str] | None = None,
) -> Path:
    """A (y, x) integer label array -> plain tiled, compressed TIFF (BigTIFF when needed), tile by tile.

    Values and dtype are kept exactly (e.g. uint32 instance ids). Rows of chunks are
    computed one band at a time from Dask (see :func:`write_tiled_tiff` for the options).

    Raises:
        InputError: not a 2D integer array, or ``tile`` not a multiple of 16 (TIFF rule).
        RasterIOError: the file cannot be written.
    """
    if labels.ndim != 2:
        raise InputError(f"write_label_tiff needs labels (y, x); got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InputError(f"labels must hold integer ids, not {labels.dtype}")
    if tile <= 0 or tile % 16:
        raise InputError(f"TIFF tiles must be a positive multiple of 16 pixels, got {tile}")
    return write_tiled_tiff(out, labels.shape, labels.dtype, _dask_tiles(labels, tile, progress), tile=tile,
                            compression=compression, bigtiff=bigtiff, pixel_size_um=pixel_size_um,
                            tags=tags)  # fmt: skip


def ome_uuid(*parts: Any) -> str:
    """A reproducible OME-XML ``UUID`` (``urn:uuid:``, UUID5 of ``parts``), so rewriting the
    same data gives the same bytes (tifffile picks a random one otherwise)."""
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, "tileseg:" + ":".join(map(str, parts))))
