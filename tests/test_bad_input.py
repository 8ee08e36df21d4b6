"""Bad input through the console script: each case ends with exactly one `error:` line that
says what is wrong, a non-zero exit status, no traceback, and no output that looks complete.

The cases follow the list of the operations issue; `test_config_cli.py` and
`test_unet.py` cover the same failures at the library level.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from tests import synth
from tests.models import tiny_unet
from tests.conftest import BAND_NAMES

TILESEG = str(Path(sys.executable).with_name("tileseg"))
FAST = ["--set", "dask.processes=false", "--set", "dask.progress=false"]


def _run(*args: str, cwd: Path | None = None, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([TILESEG, *args], capture_output=True, text=True, cwd=cwd, timeout=300, preexec_fn=preexec)


def _fails(r: subprocess.CompletedProcess, *needles: str, native_noise: str | None = None) -> str:
    """The run failed with one `error:` line containing every needle; returns that line.

    ``native_noise``: a prefix of lines that a C library prints straight to file
    descriptor 2 (out of Python's reach), allowed besides tileseg's INFO lines.
    """
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    # nothing but tileseg's INFO log lines (e.g. the dashboard link) and the error on stderr
    others = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("error:")]
    allowed = (" INFO tileseg: ",) + ((native_noise,) if native_noise else ())
    assert all(any(a in line for a in allowed) for line in others), others
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    return errors[0]


def _nothing_at(path: Path) -> None:
    """No output and no leftover temporary next to it."""
    assert not path.exists(), f"{path} exists"
    leftovers = [p.name for p in path.parent.glob(f".{path.name}*")] if path.parent.exists() else []
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """A 300 x 260 px 4-band uint16 raster, its store with threshold labels, and the COG."""
    d = tmp_path_factory.mktemp("small")
    classes = synth.class_map(260, 300, n_classes=2, seed=3)
    tif = synth.write_tif(d / "small.tif", synth.bands_from_classes(classes, seed=4), nodata=0, names=BAND_NAMES)
    store, cog = d / "s.zarr", d / "labels.tif"
    assert _run("ingest", str(tif), str(store), *FAST, "--set", "ingest.chunk_size=128").returncode == 0
    r = _run("segment", str(store), *FAST, "--set", "segment.method=threshold", "--set", "classes=[a, b]",
             "--set", "segment.threshold.expression=B03")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _run("stitch", str(store), str(cog), *FAST).returncode == 0
    return {"dir": d, "tif": tif, "store": store, "cog": cog, "classes": classes}


def _truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def test_truncated_geotiff(small, tmp_path):
    bad = _truncate(small["tif"], tmp_path / "cut.tif", 0.6)
    _fails(_run("ingest", str(bad), str(tmp_path / "s.zarr"), *FAST), "cut.tif")
    _nothing_at(tmp_path / "s.zarr")


def test_truncated_jpeg2000(tmp_path):
    """GDAL's OpenJPEG decoder reports a truncated codestream on its own threads; a read
    there used to return mostly zeros with exit status 0."""
    data = (np.random.default_rng(0).random((1, 600, 700)) * 1000).astype(np.uint16)
    good = tmp_path / "good.jp2"
    with rasterio.open(good, "w", driver="JP2OpenJPEG", width=700, height=600, count=1, dtype="uint16",
                       crs=synth.CRS, transform=rasterio.Affine(10, 0, 3e5, 0, -10, 5e6),
                       blockxsize=256, blockysize=256) as dst:  # fmt: skip
        dst.write(data)
    bad = _truncate(good, tmp_path / "cut.jp2")
    _fails(_run("ingest", str(bad), str(tmp_path / "s.zarr"), *FAST), "cut.jp2", "truncated or corrupt")
    _nothing_at(tmp_path / "s.zarr")
    assert _run("ingest", str(good), str(tmp_path / "ok.zarr"), *FAST).returncode == 0  # the intact file is fine


def test_file_that_is_not_a_raster(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("these are field notes, not pixels\n")
    _fails(_run("ingest", str(bad), str(tmp_path / "s.zarr"), *FAST), "notes.tif", "raster")
    _nothing_at(tmp_path / "s.zarr")


def test_raster_without_crs_needs_the_flag(tmp_path):
    img = synth.bands_from_classes(synth.class_map(64, 80, seed=1))
    tif = synth.write_tif(tmp_path / "nocrs.tif", img, crs=None, names=BAND_NAMES)
    _fails(_run("ingest", str(tif), str(tmp_path / "s.zarr"), *FAST), "no CRS", "ingest.allow_no_crs")
    _nothing_at(tmp_path / "s.zarr")
    r = _run("ingest", str(tif), str(tmp_path / "s.zarr"), *FAST, "--set", "ingest.allow_no_crs=true")
    assert r.returncode == 0, r.stderr
    import rioxarray  # noqa: F401
    import xarray as xr

    ds = xr.open_zarr(tmp_path / "s.zarr")
    assert ds.rio.crs is None
    np.testing.assert_array_equal(ds["image"].values, img)


def test_raster_without_any_georeferencing_is_one_line(tmp_path):
    """No CRS and no transform: rasterio's two-line NotGeoreferencedWarning came first."""
    tif = tmp_path / "bare.tif"
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):  # what tileseg's output no longer shows
        with rasterio.open(tif, "w", driver="GTiff", width=40, height=30, count=1, dtype="uint8") as dst:
            dst.write(np.ones((1, 30, 40), np.uint8))
    _fails(_run("ingest", str(tif), str(tmp_path / "s.zarr"), *FAST), "no georeferencing", "ingest.allow_no_crs")
    _nothing_at(tmp_path / "s.zarr")
    # the flag the message names works on it: pixel coordinates, rows downwards (it said "south-up")
    r = _run("ingest", str(tif), str(tmp_path / "s.zarr"), *FAST, "--set", "ingest.allow_no_crs=true")
    assert r.returncode == 0, r.stderr
    import xarray as xr

    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "s.zarr")["image"].values, np.ones((1, 30, 40), np.uint8))


def test_ground_truth_that_does_not_overlap(small, tmp_path):
    far = synth.write_tif(tmp_path / "far.tif", small["classes"], nodata=255, origin=(500000.0, 4000000.0))
    out = tmp_path / "rep"
    _fails(_run("evaluate", str(small["cog"]), str(far), *FAST, "--out-dir", str(out)), "overlap")
    assert not (out / "report.json").exists() and not (out / "error_map.tif").exists()


def test_segment_with_an_instance_only_config(small, repo_root):
    """`tileseg segment` with nuclei.yaml (segment.method none) used to run k-means and
    write cluster labels; now it refuses and leaves the store's labels as they were."""
    import xarray as xr

    before = xr.open_zarr(small["store"])["labels"].values
    r = _run("segment", str(small["store"]), "--config", str(repo_root / "config" / "nuclei.yaml"), *FAST)
    _fails(r, "segment.method is 'none'")
    np.testing.assert_array_equal(xr.open_zarr(small["store"])["labels"].values, before)


def test_band_the_raster_lacks(small, tmp_path):
    r = _run("segment", str(small["store"]), *FAST, "--set", "segment.method=threshold",
             "--set", "segment.threshold.expression=(B03 - B11) / (B03 + B11)")  # fmt: skip
    _fails(r, "B11")
    import xarray as xr

    assert "labels_partial" not in xr.open_zarr(small["store"]).data_vars


def _tiny_unet(path: Path, bands: list[str]) -> Path:
    return tiny_unet(path, bands=bands, classes=["a", "b"], scale=1.0)


def test_checkpoint_for_other_bands(small, tmp_path):
    model = _tiny_unet(tmp_path / "other.safetensors", ["B02", "B03", "B11", "B12"])
    r = _run("segment", str(small["store"]), *FAST, "--set", "segment.method=unet",
             "--set", f"segment.unet.model={model}", "--set", "segment.unet.device=cpu")  # fmt: skip
    _fails(r, "B11")


class _Payload:
    """Unpickling this creates a file: proof that a checkpoint was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_checkpoint_is_refused_and_never_executed(small, tmp_path):
    marker = tmp_path / "executed"
    sidecar = _tiny_unet(tmp_path / "tiny.safetensors", BAND_NAMES).with_suffix(".json")
    (tmp_path / "evil.json").write_text(sidecar.read_text())  # a valid sidecar: only the weights are bad
    for name in ("evil.pt", "evil.safetensors"):
        model = tmp_path / name
        model.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
        r = _run("segment", str(small["store"]), *FAST, "--set", "segment.method=unet",
                 "--set", f"segment.unet.model={model}", "--set", "segment.unet.device=cpu")  # fmt: skip
        _fails(r, name)
        assert not marker.exists()


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c.update(segmnt={"method": "threshold"}), "segmnt"),
        (lambda c: c["ingest"].update(chunk_size="big"), "ingest.chunk_size"),
        (lambda c: c["segment"]["unet"].update(overlap=2), "segment.unet.overlap"),
        (lambda c: c.setdefault("dask", {}).update(memory_limit="lots"), "dask.memory_limit"),
        (lambda c: c["segment"].setdefault("threshold", {}).update(value=float("nan")), "segment.threshold.value"),
    ],
    ids=["unknown-key", "wrong-type", "out-of-range", "memory-limit", "nan-threshold"],
)
def test_config_with_unknown_keys_or_wrong_types(small, tmp_path, repo_root, edit, field):
    cfg = yaml.safe_load((repo_root / "config" / "default.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "out")
    edit(cfg)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _fails(_run("ingest", str(small["tif"]), str(tmp_path / "s.zarr"), "--config", str(path)), field)
    _nothing_at(tmp_path / "s.zarr")


def test_a_zarr_store_where_a_raster_is_expected(small, tmp_path):
    """It read as a raster with no band: `IndexError: No such band index: 1`."""
    out = tmp_path / "ev"
    _fails(_run("evaluate", str(small["cog"]), str(small["store"]), "--classes", "a,b", "--out-dir", str(out)),
           "has no raster bands", "zarr store")  # fmt: skip
    assert not (out / "report.json").exists()
    _fails(_run("stitch", str(small["store"]), str(small["store"]), *FAST), "is a directory", "labels.tif")


def test_compare_of_a_file_that_is_not_json(small, tmp_path):
    _fails(_run("compare", str(small["cog"]), str(small["cog"])), "labels.tif", "not a JSON text file")


def test_ground_truth_without_a_labelled_pixel(small, tmp_path):
    """Every pixel unlabeled: a complete-looking report of 'evaluated 0 px', exit status 0."""
    gt = synth.write_tif(tmp_path / "gt.tif", np.full(small["classes"].shape, 255, np.uint8), nodata=255)
    out = tmp_path / "ev"
    _fails(_run("evaluate", str(small["cog"]), str(gt), "--classes", "a,b", "--out-dir", str(out)),
           "no pixel left to evaluate", "unlabeled ground truth")  # fmt: skip
    assert not (out / "report.json").exists() and not (out / "error_map.tif").exists()


@pytest.mark.parametrize("option, value, what", [("--pred-nodata", "300", "prediction nodata 300"),
                                                 ("--gt-nodata", "-1", "ground-truth nodata -1")])  # fmt: skip
def test_a_nodata_value_the_raster_cannot_hold(small, tmp_path, option, value, what):
    gt = synth.write_tif(tmp_path / "gt.tif", small["classes"].astype(np.uint8), nodata=255)
    r = _run("evaluate", str(small["cog"]), str(gt), "--classes", "a,b", "--out-dir", str(tmp_path / "ev"),
             option, value)  # fmt: skip
    _fails(r, what, "cannot occur", "uint8")


def test_messages_that_named_the_wrong_cause(small, tmp_path):
    """Each message used to blame something else: 'all nodata?' for a division by zero,
    pickled checkpoints for a .tif, and an extent of (inf, inf, inf, inf) for projected
    coordinates in a GeoJSON (WGS 84 by RFC 7946)."""
    r = _run("segment", str(small["store"]), *FAST, "--set", "segment.method=threshold",
             "--set", "segment.threshold.expression=B03 / 0")  # fmt: skip
    _fails(r, "no valid value of 'B03 / 0'", "division by zero")
    r = _run("segment", str(small["store"]), *FAST, "--set", "segment.method=unet",
             "--set", f"segment.unet.model={small['tif']}")  # fmt: skip
    _fails(r, "small.tif is not a model", "NAME.safetensors")
    x0, y1 = synth.ORIGIN
    ring = [[x0 + 10, y1 - 10], [x0 + 500, y1 - 10], [x0 + 500, y1 - 500], [x0 + 10, y1 - 10]]
    geojson = tmp_path / "utm.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"class": "a"}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    r = _run("evaluate", str(small["cog"]), str(geojson), "--classes", "a,b", "--out-dir", str(tmp_path / "ev"))
    _fails(r, "outside longitude/latitude", "RFC 7946")


def test_float_ground_truth_with_fractional_values(small, tmp_path):
    """0.5 and 1.5 were truncated to classes 0 and 1 without a word."""
    gt = synth.write_tif(tmp_path / "gt.tif", small["classes"].astype(np.float32) + 0.5, nodata=255)
    out = tmp_path / "ev"
    _fails(_run("evaluate", str(small["cog"]), str(gt), "--classes", "a,b", "--out-dir", str(out)),
           "gt.tif", "not whole class ids")  # fmt: skip
    assert not (out / "report.json").exists()
    from pipeline.config import GroundTruthConfig
    from pipeline.stages import evaluate

    whole = synth.write_tif(tmp_path / "whole.tif", small["classes"].astype(np.float32), nodata=255)
    evaluate(small["cog"], GroundTruthConfig(path=whole), ["a", "b"], out_dir=out, progress=False)  # whole ids: fine


def _file_size_limit(limit: int):
    """preexec_fn: files larger than ``limit`` bytes cannot be written (EFBIG), as on a full disk."""

    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@pytest.mark.parametrize("processes", ["false", "true"])
def test_write_error_while_ingesting(small, tmp_path, processes):
    store = tmp_path / "s.zarr"
    r = _run("ingest", str(small["tif"]), str(store), "--set", f"dask.processes={processes}",
             "--set", "dask.progress=false", preexec=_file_size_limit(20_000))  # fmt: skip
    _fails(r, "writing", str(store), "file size limit")
    _nothing_at(store)


def test_write_error_while_stitching_keeps_the_previous_cog(small, tmp_path):
    out = tmp_path / "labels.tif"
    out.write_bytes(b"previous")  # not a COG of this run: replacing it takes --overwrite
    r = _run("stitch", str(small["store"]), str(out), "--overwrite", *FAST, preexec=_file_size_limit(4_000))
    # GDAL's bundled libtiff prints "_tiffWriteProc: File too large." itself
    _fails(r, "writing COG", str(out), "free space", native_noise="_tiff")  # GDAL gives no errno
    assert out.read_bytes() == b"previous"
    assert not [p.name for p in tmp_path.glob(".labels.tif*")]


def test_permission_error_names_the_path(small, tmp_path, monkeypatch):
    """A permission error from the filesystem (simulated: the suite may run as root, which
    ignores permission bits) becomes one line naming the path and what to do."""
    from typer.testing import CliRunner

    from flows.cli import app

    real_replace = os.replace

    def deny(src, dst, *a, **k):
        if str(dst).endswith("labels.tif"):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", deny)
    out = tmp_path / "locked" / "labels.tif"
    r = CliRunner().invoke(app, ["stitch", str(small["store"]), str(out), *FAST])
    assert r.exit_code == 1, r.output
    line = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and str(out) in line[0] and "permission" in line[0].lower(), r.output
    _nothing_at(out)
