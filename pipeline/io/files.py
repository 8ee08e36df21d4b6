"""Plain files: checksums of inputs, JSON reads, and atomic writes of report files; the CPU count."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, MissingFileError, RasterIOError, io_failure

log = logging.getLogger("tileseg")

#: Files that make up one Shapefile dataset, hashed together.
_SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg")


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a container's or a pinned worker's
    limit), or ``os.cpu_count()`` where there is none (not Linux)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def sha256_file(path: str | Path, h: Any = None) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (``h``: continue an existing hash)."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum(path: str | Path) -> dict[str, str]:
    """A checksum record for an input: ``{"path", "sha256", "of"}``.

    - a file: SHA-256 of its bytes (``of: "file"``);
    - a Shapefile: SHA-256 over its ``.shp .shx .dbf .prj .cpg`` files that exist, in that
      order (``of`` lists them), since the geometry alone does not fix the classes;
    - a zarr store (directory): SHA-256 of its ``zarr.json`` (consolidated metadata:
      shapes, chunks, attributes), ``of: "zarr.json (metadata only)"``; hashing every chunk of
      a huge store would cost a full read, and tileseg stores are written once, atomically;
    - anything else: ``sha256: null`` with the reason in ``of``.
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".shp":
        parts = [p.with_suffix(s) for s in _SHAPEFILE_PARTS if p.with_suffix(s).is_file()]
        h = hashlib.sha256()
        for part in parts:
            sha256_file(part, h)
        return {"path": str(p), "sha256": h.hexdigest(), "of": "files " + ", ".join(q.name for q in parts)}
    if p.is_file():
        return {"path": str(p), "sha256": sha256_file(p), "of": "file"}
    if p.is_dir() and (p / "zarr.json").is_file():
        return {"path": str(p), "sha256": sha256_file(p / "zarr.json"), "of": "zarr.json (metadata only)"}
    return {"path": str(p), "sha256": None, "of": "not a file (no checksum)"}  # type: ignore[dict-item]


def read_json(path: str | Path) -> Any:
    """Parse a JSON file.

    Raises:
        RasterIOError: missing or unreadable file.
        InputError: not valid JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{p} is not valid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise InputError(f"{p} is not a JSON text file (it is not UTF-8 text)") from None
    except OSError as exc:
        raise RasterIOError(f"cannot read {p}: {exc}") from None


def tmp_sibling(path: Path) -> Path:
    """A hidden temporary name next to ``path`` (same filesystem, so a rename is atomic);
    stale temporaries of ``path`` are removed first (:func:`remove_stale_temporaries`)."""
    remove_stale_temporaries(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


#: A temporary is stale when its writer's process is gone and it has not changed for this
#: long (seconds): a writer on another host of a shared filesystem has a pid unknown here,
#: but it keeps its file changing.
STALE_AFTER_S = 600.0

_TMP_PID = re.compile(r"[.-](\d+)\.(?:tmp|partial)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the hidden temporaries that writers of ``path`` killed by SIGKILL (or a power
    cut) left beside it: ``.<name>.<pid>.tmp``, ``.<name>.<tag>-<pid>.tmp.tif`` (and GDAL's
    ``.ovr.tmp`` beside it), ``.<name>.<pid>.partial``, whose process no longer runs and
    which have not changed for :data:`STALE_AFTER_S`. Returns what was removed."""
    import shutil
    import time

    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*"):
        m = _TMP_PID.search(tmp.name[len(path.name) + 1 :])
        try:
            if m is None or _alive(int(m.group(1))) or now - tmp.stat().st_mtime < STALE_AFTER_S:
                continue
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
        removed.append(tmp)
    if removed:
        log.info("removed %d stale temporary file(s) of %s left by a killed run", len(removed), path)
    return removed


def publish_texts(items: list[tuple[Path, str]], written: list[tuple[Path, Path]] | None = None) -> None:
    """Write several text files so that none appears half-written: each goes to a
    temporary sibling first; when all are written, they are renamed onto their names in
    order (so the last one appears last). ``written`` are files already complete under a
    temporary name, as (temporary, final) pairs: they are renamed first, in the same step.
    On failure the temporaries are removed and the existing files are left as they were.

    Raises:
        RasterIOError: a file cannot be written or renamed.
    """
    staged: list[tuple[Path, Path]] = list(written or [])
    path = staged[0][1] if staged else Path(".")
    try:
        for path, text in items:
            tmp = tmp_sibling(path)
            staged.append((tmp, path))
            tmp.write_text(text, encoding="utf-8")
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as exc:
        raise io_failure("writing", path, exc) from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
