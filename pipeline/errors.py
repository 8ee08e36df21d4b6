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

    def __reduce__(self):  # type: ignore[override]
        # Errors raised in a Dask worker process are pickled to the client; keep ``errno``
        # (an OSError slot that plain exception pickling drops), so retries can still tell
        # a full disk from a flaky read.
        state = dict(getattr(self, "__dict__", {}))
        if isinstance(self, OSError) and self.errno is not None:
            state["errno"] = self.errno
        return (type(self), self.args, state)


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


_HINTS = {
    "ENOSPC": "free disk space (or choose another output folder) and rerun",
    "EFBIG": "the file exceeds a file size limit (ulimit -f or the filesystem's); free space or raise the limit",
    "EDQUOT": "the disk quota is exceeded; free space and rerun",
    "EACCES": "check that you may write to that folder (permissions), or choose another output folder",
    "EPERM": "check that you may write to that folder (permissions), or choose another output folder",
    "EROFS": "the filesystem is read-only; choose another output folder",
}


def io_failure(action: str, path: object, exc: BaseException) -> RasterIOError:
    """A one-line :class:`RasterIOError` for an OS or GDAL error while ``action`` (e.g.
    "writing") ``path``, with a hint for disk-full and permission errors.

    The reason comes from ``exc.strerror`` (an ``OSError``) or the message (GDAL errors,
    which carry no errno); rasterio's "See previous exception" is replaced by its cause.
    """
    import errno as _errno

    cause = exc.__cause__ if exc.__cause__ is not None and "previous exception" in str(exc) else exc
    code = exc.errno if isinstance(exc, OSError) else None  # GDAL's CPLE errors have an unrelated errno
    name = _errno.errorcode.get(code, "") if isinstance(code, int) else ""
    text = str(cause).strip()
    reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    hint = _HINTS.get(name)
    if hint is None:
        text = text.lower()
        hint = next((h for key, h in (("no space", _HINTS["ENOSPC"]), ("too large", _HINTS["EFBIG"]),
                                      ("permission denied", _HINTS["EACCES"]), ("read-only", _HINTS["EROFS"]))
                     if key in text), None)  # fmt: skip
    if hint is None:  # GDAL's message may not say why (TIFFRewriteDirectory...): look at the disk
        hint = _HINTS["ENOSPC"] if _nearly_full(path) else "check the path, free space and permissions, and rerun"
    failure = RasterIOError(f"{action} {path} failed: {reason}; {hint}")
    failure.errno = code  # kept, so that callers (retries) can tell a full disk from a flaky read
    return failure


def _nearly_full(path: object, below: int = 16 * 2**20) -> bool:
    """Whether the filesystem of ``path`` (or of its nearest existing parent) has less than
    ``below`` bytes free; False when that cannot be told."""
    import shutil
    from pathlib import Path

    try:
        p = Path(str(path)).absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        return shutil.disk_usage(p).free < below
    except (OSError, ValueError):
        return False


class OutputExistsError(TilesegError, FileExistsError):
    """An output path already holds another run's output; ``--overwrite`` replaces it."""


class ChunkError(TilesegError, RuntimeError):
    """An unexpected error inside a per-chunk task, re-raised with the stage, chunk and input.

    Errors that already are :class:`TilesegError` keep their own type instead (see
    :func:`pipeline.apply.in_chunk`); this one wraps everything else.
    """
