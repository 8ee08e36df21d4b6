"""One exception root for tileseg.

Every error tileseg raises on purpose derives from :class:`TilesegError`, and
also from the builtin it resembles (``ValueError`` for bad input or config,
``OSError`` for files), following rasterio's ``RasterioIOError(RasterioError,
OSError)``: callers may catch either. Messages say what is wrong and what to do.
The CLI turns a ``TilesegError`` into a one-line message and exit status 1.
"""

from __future__ import annotations


class TilesegError(Exception):
    """Root of all tileseg errors."""


class ConfigError(TilesegError, ValueError):
    """A run config is invalid (unknown key, wrong type, inconsistent values)."""


class InputError(TilesegError, ValueError):
    """An input raster, vector or store is unusable (missing bands, no overlap, ...)."""


class RasterIOError(TilesegError, OSError):
    """A file could not be read or written (missing, corrupt, not a raster)."""


class MissingFileError(RasterIOError, FileNotFoundError):
    """A file that must exist does not (an input, a model, ground truth). Not transient:
    Prefect's I/O retries (``flows.retry``) skip it."""


class DataFetchError(TilesegError, OSError):
    """The sample data could not be fetched or failed its checksum."""
