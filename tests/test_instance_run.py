"""Instance segmentation on the real nuclei sample (stardist 0.9.2 wheel, 2018 Data Science
Bowl): the `tileseg run config/nuclei.yaml` flow, its OME-Zarr output, and tiled vs
single-piece results on a mosaic of the image."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import xarray as xr
from sklearn.metrics import adjusted_rand_score

from pipeline import instance_stages, stages
from pipeline.config import IngestConfig, InstanceEvaluateConfig, MicroscopyConfig, absolute_paths, load_config
from pipeline.io.mosaic import write_mosaic
from pipeline.io.sample import fetch
from pipeline.object_metrics import instance_counts, instance_metrics

TILESEG = str(Path(sys.executable).with_name("tileseg"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nuclei(repo_root) -> Path:
    return fetch("nuclei", repo_root / "data" / "cache")


@pytest.fixture(scope="module")
def nuclei_config(repo_root):
    return load_config(repo_root / "config" / "nuclei.yaml")


def test_nuclei_run_prints_object_metrics(nuclei, repo_root, tmp_path, prefect_home):
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "out"
    # reports to the session's Prefect server rather than starting a temporary one (10-20 s)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(prefect_home))
    r = subprocess.run(
        [TILESEG, "run", "config/nuclei.yaml", "--set", f"output_dir={out}", "--set", "dask.progress=false"],
        capture_output=True, text=True, cwd=repo_root, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in (r.stdout + r.stderr).splitlines() if x.startswith("at IoU 0.5:"))
    assert " F1 " in line and " AP " in line
    doc = json.loads((out / "report_instances.json").read_text())
    # the report equals the metrics computed here from the written labels and the mask
    labels = tifffile.imread(out / "instances.tif")
    mask = tifffile.imread(nuclei / "mask2d.tif")
    m = instance_metrics(instance_counts(mask, labels))
    assert doc["metrics"]["f1_at_0.5"] == pytest.approx(m.at(0.5)["f1"])
    assert doc["metrics"]["per_threshold"]["ap"] == pytest.approx([float(v) for v in m.ap])
    assert f"F1 {m.at(0.5)['f1']:.4f}" in line and f"AP {m.at(0.5)['ap']:.4f}" in line
    assert doc["metrics"]["n_ground_truth"] == len(np.unique(mask)) - 1
    page = (out / "report_instances.html").read_text()
    assert "src=\"http" not in page and "data:image/png;base64," in page  # self-contained
    assert f"{m.at(0.5)['f1']:.4f}" in page
    # the segmentation finds most nuclei (a sanity bound, far below what it reaches)
    assert m.at(0.5)["f1"] > 0.5
    # each output records the run; another config is refused before it writes anything
    from pipeline.resume import recorded_run

    key = absolute_paths(load_config(repo_root / "config" / "nuclei.yaml", [f"output_dir={out}"]), repo_root).config_hash()
    for name in ("instances.ome.zarr", "instances.tif", "report_instances.json"):
        assert recorded_run(out / name) == key, name
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = subprocess.run(
        [TILESEG, "run", "config/nuclei.yaml", "--set", f"output_dir={out}", "--set", "instances.min_size=30"],
        capture_output=True, text=True, cwd=repo_root, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    (error,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert "was written by run" in error and "--overwrite" in error
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_nuclei_ome_zarr_opens_with_ome_zarr_py(nuclei, nuclei_config, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    store = instance_stages.ingest_inputs([nuclei / "img2d.tif"], tmp_path / "s.zarr",
                                          nuclei_config.ingest, MicroscopyConfig(pixel_size_um=0.5),
                                          progress=False)  # fmt: skip
    instance_stages.segment_instances(store, nuclei_config.instances, progress=False)
    paths = instance_stages.export_instances(store, tmp_path, nuclei_config.instances, progress=False)
    nodes = list(Reader(parse_url(str(paths["ome_zarr"])))())
    image = nodes[0]
    ms = image.metadata
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    scales = [t[0]["scale"] for t in ms["coordinateTransformations"]]
    assert scales[0] == [1.0, 0.5, 0.5] and scales[1] == [1.0, 1.0, 1.0]  # µm, doubling per level
    label_nodes = [n for n in nodes if n.load(Label) is not None]
    assert len(label_nodes) == 1, "ome-zarr-py finds the instances as a label image"
    level0 = np.asarray(label_nodes[0].data[0])
    np.testing.assert_array_equal(level0, xr.open_zarr(store)["instances"].values)


@pytest.fixture(scope="module")
def mosaic(nuclei, tmp_path_factory) -> tuple[Path, Path]:
    """A 4 x 4 mosaic of the nuclei image (2048 x 2048 px) and of its mask (unique ids)."""
    return write_mosaic(nuclei / "img2d.tif", nuclei / "mask2d.tif", tmp_path_factory.mktemp("mosaic"), 4, 4)


def test_tiled_instances_equal_the_single_piece_run_on_the_mosaic(mosaic, nuclei_config, tmp_path):
    image_path, mask_path = mosaic
    cfg = nuclei_config.instances
    image = tifffile.imread(image_path)
    mask = tifffile.imread(mask_path)
    results = {}
    for chunk in (256, 600, 2048):  # 2048: one chunk, no stitching at all
        store = stages.ingest_microscopy(image_path, tmp_path / f"c{chunk}.zarr", IngestConfig(chunk_size=chunk),
                                         progress=False)  # fmt: skip
        instance_stages.segment_instances(store, cfg, progress=False)
        ds = xr.open_zarr(store)
        results[chunk] = (ds["instances"].values, ds["instances"].attrs["threshold"])
    # the single-piece oracle: the kernel once on the whole image, same global threshold
    kernel = instance_stages.classical_kernel(cfg, ["nuclei"], None)
    kernel = dataclasses.replace(kernel, threshold=results[2048][1])
    single = kernel(image[None].astype(np.float32), np.ones(image.shape, bool))
    n_single = len(np.unique(single)) - 1
    ref_metrics = instance_metrics(instance_counts(mask, single))
    for chunk, (labels, threshold) in results.items():
        assert threshold == results[2048][1]  # the Otsu threshold is global
        assert labels.dtype == np.uint16 and labels.max() == len(np.unique(labels)) - 1  # ids 1..N
        assert len(np.unique(labels)) - 1 == n_single, chunk
        assert adjusted_rand_score(single.ravel(), labels.ravel()) >= 0.999, chunk
        m = instance_metrics(instance_counts(mask, labels))
        np.testing.assert_array_equal(m.tp, ref_metrics.tp)
        np.testing.assert_array_equal(m.fp, ref_metrics.fp)
        np.testing.assert_allclose(m.f1, ref_metrics.f1)


def test_instance_evaluation_refuses_a_mask_on_another_grid(nuclei, nuclei_config, tmp_path):
    store = instance_stages.ingest_inputs([nuclei / "img2d.tif"], tmp_path / "s.zarr", nuclei_config.ingest,
                                          MicroscopyConfig(), progress=False)  # fmt: skip
    instance_stages.segment_instances(store, nuclei_config.instances, progress=False)
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, tifffile.imread(nuclei / "mask2d.tif")[:256])
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="on the image's grid"):
        instance_stages.evaluate_instances(store, InstanceEvaluateConfig(ground_truth=small), tmp_path)
    assert not (tmp_path / "report_instances.json").exists()
