from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import synth

BAND_NAMES = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="session")
def scene(tmp_path_factory) -> dict:
    """A 777 x 1000 px (y, x), 4-band uint16 scene with a 5 px nodata (0) collar, its
    class map, and a ground-truth raster (255 = unlabeled on a stripe)."""
    d = tmp_path_factory.mktemp("scene")
    classes = synth.class_map(777, 1000, n_classes=4, seed=0)
    image = synth.bands_from_classes(classes, n_bands=4, seed=1, nodata_collar=5)
    tif = synth.write_tif(d / "scene.tif", image, nodata=0, names=BAND_NAMES)
    gt = classes.copy()
    gt[:, 400:450] = 255
    gt_tif = synth.write_tif(d / "gt.tif", gt, nodata=255)
    return {"dir": d, "tif": tif, "image": image, "classes": classes, "gt": gt, "gt_tif": gt_tif}


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory):
    """Prefect's test harness (a temporary database and API server, stopped cleanly at the
    end of the session) in a throw-away PREFECT_HOME, without telemetry."""
    home = tmp_path_factory.mktemp("prefect-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(home))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield home
    mp.undo()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def pytest_configure(config):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
