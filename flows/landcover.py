"""Prefect flow ``landcover_run``: ingest -> segment -> stitch -> evaluate.

A thin adapter over :mod:`pipeline.stages`. Prefect tasks are whole stages (never
tiles) and pass paths, not arrays; the per-chunk work inside each stage runs on the
Dask cluster chosen by ``config.dask`` (a LocalCluster, or an existing scheduler).
The flow's single parameter is the pydantic :class:`~pipeline.config.RunConfig`, so
the Prefect UI renders it as a form and validates every field.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import stages
from pipeline.cluster import dask_client
from pipeline.config import RunConfig
from pipeline.report import aggregate_table, console_table, exclusion_table, iou_table, markdown


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(config: RunConfig) -> Path:
    return stages.ingest(config.inputs, config.store_path, config.ingest, config.dask.progress)


@task(name="segment", cache_policy=NO_CACHE)
def segment_task(store: Path, config: RunConfig) -> Path:
    return stages.segment(store, config.segment, config.classes, config.evaluate.ground_truth, config.dask.progress)


@task(name="stitch", cache_policy=NO_CACHE)
def stitch_task(store: Path, config: RunConfig) -> Path:
    return stages.stitch(store, config.cog_path, config.stitch, config.classes, config.dask.progress)


@task(name="evaluate", cache_policy=NO_CACHE)
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


@flow(name="landcover_run", log_prints=True)
def landcover_run(config: RunConfig) -> dict[str, str]:
    """Run the whole land-cover pipeline for one config; returns the output paths."""
    logger = get_run_logger()
    outputs: dict[str, str] = {}
    with dask_client(config.dask):  # logs the Dask dashboard link
        store = ingest_task(config)
        store = segment_task(store, config)
        cog = stitch_task(store, config)
        outputs.update(store=str(store), cog=str(cog))
        if config.evaluate.ground_truth is not None:
            result = evaluate_task(cog, config)
            outputs.update(result.paths())
            publish_artifacts(result, config.name)
            print("\n" + console_table(result.report))
    for k, v in outputs.items():
        logger.info("%s: %s", k, v)
    return outputs
