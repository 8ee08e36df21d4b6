"""Large test images from a small one: a rows x cols mosaic of an image and of its instance mask.

The mosaic of the stardist nuclei sample (512 x 512 px) is tileseg's large-image
microscopy case: 8 x 8 copies make a 4096 x 4096 px image with 64 times the objects.
Both files are tiled BigTIFF OME-TIFFs written tile by tile (the mosaic never sits in
memory whole). In the mask, copy k (row-major, ``k = copy_row * cols + copy_col``) has
its ids offset by ``k * max_id`` (background 0 stays 0), so every object id is unique;
the mask is uint32. The output is deterministic: same inputs, same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import InputError, RasterIOError
from pipeline.io.ome import ome_uuid, write_tiled_tiff

#: Default mosaic size (copies along y and x) of ``tileseg data mosaic``.
DEFAULT_ROWS = DEFAULT_COLS = 8


def _tiles(src: np.ndarray, rows: int, cols: int, tile: int, id_step: int | None) -> Iterator[np.ndarray]:
    """Row-major (tile, tile) tiles of the mosaic of ``src`` (y, x); ids offset per copy when ``id_step``."""
    h, w = src.shape
    height, width = rows * h, cols * w
    dtype = np.uint32 if id_step is not None else src.dtype
    for r0 in range(0, height, tile):
        rr = np.arange(r0, min(r0 + tile, height))
        for c0 in range(0, width, tile):
            cc = np.arange(c0, min(c0 + tile, width))
            block = src[np.ix_(rr % h, cc % w)].astype(dtype)
            if id_step is not None:
                copy = (rr // h)[:, None] * cols + (cc // w)[None, :]
                block = np.where(block > 0, block + (copy * id_step).astype(np.uint32), 0).astype(np.uint32)
            out = np.zeros((tile, tile), dtype)
            out[: block.shape[0], : block.shape[1]] = block
            yield out


def _read_2d(path: Path) -> np.ndarray:
    import tifffile

    try:
        arr = tifffile.imread(path)
    except (OSError, tifffile.TiffFileError) as exc:
        raise RasterIOError(f"cannot read {path}: {exc}; run `tileseg data fetch --sample nuclei` first") from None
    if arr.ndim != 2:
        raise InputError(f"{path}: a mosaic needs a 2D (y, x) image, got shape {arr.shape}")
    return arr


def write_mosaic(
    image: str | Path,
    mask: str | Path,
    out_dir: str | Path,
    rows: int = DEFAULT_ROWS,
    cols: int = DEFAULT_COLS,
    tile: int = 256,
    channel_name: str = "nuclei",
) -> tuple[Path, Path]:
    """Write the rows x cols mosaic of a 2D image and of its instance mask into ``out_dir``.

    Args:
        image: a 2D (y, x) TIFF, any dtype (kept).
        mask: its 2D instance mask, integer ids, 0 = background, same shape.
        rows, cols: copies along y and x.
        tile: TIFF tile edge in pixels (a multiple of 16).
        channel_name: the image's OME channel name.

    Returns:
        (image mosaic, mask mosaic) paths: ``<stem>_mosaic_<rows>x<cols>.ome.tif``.

    Raises:
        InputError: shapes differ, not 2D, non-integer mask, sizes out of range, or ids that
            would not fit in uint32.
        RasterIOError: an input cannot be read or an output written.
    """
    image, mask, out_dir = Path(image), Path(mask), Path(out_dir)
    if rows < 1 or cols < 1:
        raise InputError(f"a mosaic needs at least 1 x 1 copies, got {rows} x {cols}")
    if tile <= 0 or tile % 16:
        raise InputError(f"TIFF tiles must be a positive multiple of 16 pixels, got {tile}")
    img, msk = _read_2d(image), _read_2d(mask)
    if img.shape != msk.shape:
        raise InputError(f"image {img.shape} and mask {msk.shape} differ in shape")
    if not np.issubdtype(msk.dtype, np.integer) or msk.min() < 0:
        raise InputError(f"{mask}: the mask must hold non-negative integer ids, not {msk.dtype}")
    step = int(msk.max())
    if step * rows * cols >= 2**32:
        raise InputError(f"{rows} x {cols} copies of ids up to {step} do not fit in uint32; use fewer copies")
    shape = (rows * img.shape[0], cols * img.shape[1])
    outs = []
    for src, path, name, step_k in ((img, image, channel_name, None), (msk, mask, "labels", step)):
        out = out_dir / f"{path.name.split('.')[0]}_mosaic_{rows}x{cols}.ome.tif"
        meta = {"axes": "YX", "Channel": {"Name": [name]}, "Creator": "tileseg",
                "UUID": ome_uuid(path.name, rows, cols, tile)}  # fmt: skip
        outs.append(write_tiled_tiff(out, shape, np.uint32 if step_k is not None else src.dtype,
                                     _tiles(src, rows, cols, tile, step_k), tile=tile, bigtiff=True,
                                     ome_metadata=meta))  # fmt: skip
    return outs[0], outs[1]
