"""The run summary: label counts from the store, its Markdown, and the flow's artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from pipeline import stages
from pipeline.config import LABEL_NODATA, load_config
from pipeline.errors import InputError
from pipeline.summary import RunSummary, label_counts, summary_markdown
from tests import synth

BANDS = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A 90 x 130 px (y, x) 4-band uint16 scene with a 4 px nodata (0) collar, its ground
    truth, and the labels a fixed threshold on B03 must give (computed here with numpy)."""
    d = tmp_path_factory.mktemp("summary")
    classes = synth.class_map(90, 130, n_classes=3, seed=3)
    image = synth.bands_from_classes(classes, n_bands=4, seed=4, nodata_collar=4)
    synth.write_tif(d / "scene.tif", image, nodata=0, names=BANDS)
    synth.write_tif(d / "gt.tif", (classes > 0).astype(np.uint8), nodata=255)
    b03 = image[1].astype(np.float64)
    value = float(np.median(b03[b03 > 0]))
    expected = np.where(b03 == 0, LABEL_NODATA, (b03 > value).astype(np.uint8)).astype(np.uint8)
    return {"dir": d, "image": image, "value": value, "expected": expected}


def _config(tiny, out):
    return load_config(None, [
        "name=tiny-summary", f"inputs=[{tiny['dir'] / 'scene.tif'}]", f"output_dir={out}", "classes=[land, water]",
        "ingest.chunk_size=32", "segment.method=threshold", "segment.threshold.expression=B03",
        f"segment.threshold.value={tiny['value']}", f"evaluate.ground_truth.path={tiny['dir'] / 'gt.tif'}",
        "evaluate.report.checksums=false", "dask.processes=false", "dask.n_workers=1", "dask.progress=false",
    ])  # fmt: skip


def test_label_counts_equal_numpy_on_the_whole_array(tiny, tmp_path):
    cfg = _config(tiny, tmp_path)
    store = stages.ingest(cfg.inputs, cfg.store_path, cfg.ingest, progress=False)
    with pytest.raises(InputError, match="no labels"):
        label_counts(store)
    stages.segment(store, cfg.segment, cfg.classes, progress=False)
    counts = label_counts(store)
    assert counts.shape == (90, 130) and counts.band_names == BANDS
    np.testing.assert_array_equal(counts.per_value, np.bincount(tiny["expected"].ravel(), minlength=256))
    assert counts.nodata == int((tiny["expected"] == LABEL_NODATA).sum()) == 90 * 130 - 86 * 126
    assert counts.labelled == 86 * 126
    assert counts.per_class() == {0: int((tiny["expected"] == 0).sum()), 1: int((tiny["expected"] == 1).sum())}


def test_markdown_lists_inputs_outputs_counts_durations_and_iou_only_when_evaluated(tiny, tmp_path):
    cfg = _config(tiny, tmp_path)
    store = stages.ingest(cfg.inputs, cfg.store_path, cfg.ingest, progress=False)
    stages.segment(store, cfg.segment, cfg.classes, progress=False)
    s = RunSummary("tiny-summary", cfg.config_hash(), ["scene.tif"], {"store": str(store)}, ["land", "water"],
                   label_counts(store), {"ingest": 1.4, "segment": 2.5})  # fmt: skip
    md = summary_markdown(s)
    n_water = int((tiny["expected"] == 1).sum())
    assert f"| 1 | water | {n_water:,} | {100 * n_water / (86 * 126):.2f} % |" in md
    assert f"| labelled (valid) | {86 * 126:,} |" in md and "Raster 90 x 130 px (y, x), 4 bands" in md
    assert "| ingest | 1.4 |" in md and "| segment | 2.5 |" in md and "| total | 3.9 |" in md
    assert f"| store | `{store}` |" in md and cfg.config_hash() in md
    assert "IoU" not in md  # no ground truth, no IoU section

    report = {"aggregates": {"macro_miou": 0.5}, "evaluated_pixels": 10, "classes": [], "area_unit": "ha"}
    md = summary_markdown(RunSummary("r", "h", [], {}, report=report))
    assert "## IoU against ground truth" in md and "Macro mIoU 0.5000 over 10 evaluated pixels" in md


def test_the_flow_publishes_the_run_summary_artifact(tiny, tmp_path, prefect_home):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.landcover import landcover_run

    state = landcover_run(_config(tiny, tmp_path / "out"), return_state=True)
    assert state.is_completed()
    outputs = state.result()
    this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        (md,) = [a.data for a in client.read_artifacts(artifact_filter=this_run) if a.key == "run-summary"]
    with rasterio.open(outputs["cog"]) as cog:
        labels = cog.read(1)
    np.testing.assert_array_equal(labels, tiny["expected"])  # the run's labels, so the counts below are the run's
    assert f"| 0 | land | {int((labels == 0).sum()):,} |" in md
    assert f"| 1 | water | {int((labels == 1).sum()):,} |" in md
    for stage in ("ingest", "segment", "stitch", "evaluate"):
        assert f"| {stage} | " in md
    for k, v in outputs.items():
        assert f"| {k} | `{v}` |" in md
    report = json.loads(open(outputs["report_json"]).read())
    assert f"Macro mIoU {report['aggregates']['macro_miou']:.4f}" in md
    for c in report["classes"]:
        assert f"| {c['name']} | {c['iou']:.4f} |" in md
