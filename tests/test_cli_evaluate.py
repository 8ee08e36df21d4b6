"""`tileseg evaluate` on a prediction raster that tileseg did not write, and `tileseg compare`."""

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from shapely.geometry import box
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests import synth

TILESEG = str(Path(sys.executable).with_name("tileseg"))
X0, Y1 = synth.ORIGIN
SETS = ["--set", "dask.processes=false", "--set", "dask.progress=false", "--set", "dask.n_workers=1"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Two evaluations through the console script of foreign int16 predictions (nodata -1, no
    CLASS_NAMES tag, 0 a real class) against polygons whose column holds OSM-like values."""
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(2)
    polys = [box(X0 + a, Y1 - b - 150, X0 + a + 150, Y1 - b) for a, b in rng.uniform(0, 450, size=(25, 2))]
    kinds = rng.choice(["farmland", "forest", "reservoir"], 25)
    gpd.GeoDataFrame({"fclass": kinds}, geometry=polys, crs="EPSG:32633").to_file(d / "gt.gpkg")
    truth = synth.class_map(60, 60, 3, seed=5).astype(np.int16)
    out = {}
    for run, noise in (("a", 0.4), ("b", 0.2)):
        pred = np.where(rng.random(truth.shape) < noise, rng.integers(0, 3, truth.shape), truth).astype(np.int16)
        pred[:3] = -1
        synth.write_tif(d / f"pred_{run}.tif", pred, nodata=-1)
        r = subprocess.run(
            [TILESEG, "evaluate", str(d / f"pred_{run}.tif"), str(d / "gt.gpkg"), "--classes", "farm,forest,water",
             "--class-column", "fclass", "--class-map", "farmland=farm", "--class-map", "forest=forest",
             "--class-map", "reservoir=2", "--area-bbox", f"{X0 + 50},{Y1 - 550},{X0 + 600},{Y1}",
             "--out-dir", str(d / run), *SETS],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out[run] = (r, d / run / "report.json")
    return out


def test_cli_evaluate_prints_metrics_and_output_paths(reports):
    r, path = reports["a"]
    for name in ("macro mIoU", "frequency-weighted IoU", "micro IoU", "overall accuracy", "mean class accuracy",
                 "Cohen's kappa"):  # fmt: skip
        assert name in r.stdout
    for out in ("report.json", "report.md", "report.html", "error_map.tif"):
        assert f"{path.parent / out}" in r.stdout
    assert "ERROR" not in r.stderr and "Traceback" not in r.stderr
    doc = json.loads(path.read_text())
    assert [c["name"] for c in doc["classes"]] == ["farm", "forest", "water"]
    assert doc["prediction_options"]["nodata_used"] == -1
    assert doc["excluded_pixels"]["nodata_prediction"] > 0 and doc["excluded_pixels"]["outside_area"] > 0
    assert doc["classes"][0]["support_pixels"] > 0  # class 0 is scored, not taken for nodata


def test_compare_prints_per_class_differences(reports):
    a, b = (json.loads(reports[k][1].read_text()) for k in ("a", "b"))
    res = CliRunner().invoke(app, ["compare", str(reports["a"][1]), str(reports["b"][1])])
    assert res.exit_code == 0, res.output
    for ca, cb in zip(a["classes"], b["classes"]):
        row = next(line for line in res.output.splitlines() if line.startswith(ca["name"] + " "))
        assert f"{cb['iou'] - ca['iou']:+.4f}" in row
    row = next(line for line in res.output.splitlines() if line.startswith("macro mIoU"))
    assert f"{b['aggregates']['macro_miou'] - a['aggregates']['macro_miou']:+.4f}" in row


def test_compare_refuses_different_class_lists(reports, tmp_path):
    doc = json.loads(reports["b"][1].read_text())
    doc["classes"][2]["name"] = "lake"
    other = tmp_path / "report.json"
    other.write_text(json.dumps(doc))
    res = CliRunner().invoke(app, ["compare", str(reports["a"][1]), str(other)])
    assert res.exit_code == 1
    assert res.output.strip().count("\n") == 0 and "different class lists" in res.output


def test_compare_names_an_instance_report(reports, tmp_path):
    inst = tmp_path / "report_instances.json"
    inst.write_text(json.dumps({"kind": "instances", "metrics": {}}))
    res = CliRunner().invoke(app, ["compare", str(reports["a"][1]), str(inst)])
    assert res.exit_code == 1
    assert res.output.strip().count("\n") == 0 and "is an object-level (instances) report" in res.output


def test_area_config_forms(tmp_path):
    cfg = load_config(None, ["evaluate.area={xmin: 0, ymin: 0, xmax: 10, ymax: 10}"])
    assert cfg.evaluate.area.bbox.xmax == 10
    assert load_config(None, ["evaluate.area={polygons: a.gpkg}"]).evaluate.area.polygons == Path("a.gpkg")
    with pytest.raises(ConfigError, match="exactly one of bbox, polygons, mask"):
        load_config(None, ["evaluate.area={polygons: a.gpkg, mask: m.tif}"])
    with pytest.raises(ConfigError, match=r"evaluate\.ground_truth\.line_buffer"):
        load_config(None, ["evaluate.ground_truth={path: g.gpkg, line_buffer: -1}"])
    # YAML reads integer keys; class maps are keyed by the value's text
    cfg = load_config(None, ["evaluate.ground_truth={path: g.tif, class_map: {311: forest, 512: 2}}"])
    assert cfg.evaluate.ground_truth.class_map == {"311": "forest", "512": 2}
