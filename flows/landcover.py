"""Prefect flow ``landcover_run``: ingest -> segment -> stitch -> evaluate.

A thin adapter over :mod:`pipeline.stages`. Prefect tasks are whole stages (never
tiles) and pass paths, not arrays; the per-chunk work inside each stage runs on the
Dask cluster chosen by ``config.dask`` (a LocalCluster, or an existing scheduler).
The flow's single parameter is the pydantic :class:`~pipeline.config.RunConfig`, so
the Prefect UI renders it as a form and validates every field.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.retry import io_retry_options
from pipeline import stages
from pipeline.cluster import dask_client
from pipeline.config import RunConfig, absolute_paths, check_scorable
from pipeline.report import aggregate_table, console_table, exclusion_table, iou_table, markdown
from pipeline.resume import check_run_outputs
from pipeline.summary import RunSummary, label_counts, summary_markdown

T = TypeVar("T")


# I/O stages (ingest reads the inputs; stitch and evaluate write files) are retried with
# backoff on transient OSErrors only (flows.retry); segment, a pure compute stage, is not.
@task(name="ingest", cache_policy=NO_CACHE, **io_retry_options())
def ingest_task(config: RunConfig) -> Path:
    return stages.ingest(config.inputs, config.store_path, config.ingest, config.dask.progress, config.overwrite)


@task(name="segment", cache_policy=NO_CACHE)
def segment_task(store: Path, config: RunConfig) -> Path:
    return stages.segment(store, config.segment, config.classes, config.evaluate.ground_truth, config.dask.progress,
                          config.overwrite)  # fmt: skip


@task(name="stitch", cache_policy=NO_CACHE, **io_retry_options())
def stitch_task(store: Path, config: RunConfig) -> Path:
    return stages.stitch(store, config.cog_path, config.stitch, config.classes, config.dask.progress,
                         config.config_hash(), config.overwrite)  # fmt: skip


@task(name="evaluate", cache_policy=NO_CACHE, **io_retry_options())
def evaluate_task(cog: Path, config: RunConfig) -> stages.EvaluationResult:
    ev = config.evaluate
    assert ev.ground_truth is not None
    return stages.evaluate(
        cog,
        ev.ground_truth,
        config.classes or None,
        ev.area,
        config.output_dir,
        config.ingest.chunk_size,
        config.dask.progress,
        prediction=ev.prediction,
        image=ev.image or config.store_path,  # the run's store: valid(image) and the quicklook
        report=ev.report,
        run_config_hash=config.config_hash(),
        overwrite=config.overwrite,
    )


def publish_artifacts(result: stages.EvaluationResult, run_name: str) -> None:
    """The report's tables as Prefect artifacts, so a run started from the UI shows its IoU there."""
    doc = result.report
    agg = doc["aggregates"]
    miou = "n/a" if agg["macro_miou"] is None else f"{agg['macro_miou']:.4f}"
    create_table_artifact(key="iou-table", table=iou_table(doc),
                          description=f"Per-class metrics of {run_name}; macro mIoU {miou} (* = not applicable)")  # fmt: skip
    create_table_artifact(key="aggregate-metrics", table=aggregate_table(doc),
                          description=f"Aggregate metrics of {run_name}")  # fmt: skip
    create_table_artifact(key="excluded-pixels", table=exclusion_table(doc),
                          description=f"Evaluated and excluded pixels of {run_name}")  # fmt: skip
    create_markdown_artifact(key="iou-report", markdown=markdown(doc), description=f"Evaluation report of {run_name}")


@task(name="summary", cache_policy=NO_CACHE)
def summary_task(summary: RunSummary, store: Path, progress: bool) -> str:
    """Count the labels in the store, publish the ``run-summary`` Markdown artifact; returns its Markdown."""
    text = summary_markdown(replace(summary, counts=label_counts(store, progress)))
    create_markdown_artifact(key="run-summary", markdown=text, description=f"Run summary of {summary.name}")
    return text


def _timed(durations: dict[str, float], stage: str, fn: Callable[[], T]) -> T:
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        durations[stage] = time.perf_counter() - t0


@flow(name="landcover_run", log_prints=True)
def landcover_run(config: RunConfig) -> dict[str, str]:
    """Run the whole land-cover pipeline for one config; returns the output paths.

    Publishes the evaluation tables (when ``evaluate.ground_truth`` is set) and a
    ``run-summary`` Markdown artifact: inputs, outputs, pixel counts per class, stage
    durations and the IoU table.
    """
    logger = get_run_logger()
    outputs: dict[str, str] = {}
    config = absolute_paths(config)  # Dask workers may run in another directory
    check_scorable(config)
    check_run_outputs(config)  # another run's outputs: refused before anything is written
    took: dict[str, float] = {}
    report = None
    with dask_client(config.dask):  # the threaded scheduler, or a cluster (whose dashboard link it logs)
        store = _timed(took, "ingest", lambda: ingest_task(config))
        store = _timed(took, "segment", lambda: segment_task(store, config))
        cog = _timed(took, "stitch", lambda: stitch_task(store, config))
        outputs.update(store=str(store), cog=str(cog))
        if config.evaluate.ground_truth is not None:
            result = _timed(took, "evaluate", lambda: evaluate_task(cog, config))
            outputs.update(result.paths())
            publish_artifacts(result, config.name)
            report = result.report
            print("\n" + console_table(result.report))
        summary = RunSummary(config.name, config.config_hash(), [str(p) for p in config.inputs], dict(outputs),
                             config.class_names(), durations_s=took, report=report)  # fmt: skip
        summary_task(summary, store, config.dask.progress)
    for k, v in outputs.items():
        logger.info("%s: %s", k, v)
    return outputs
