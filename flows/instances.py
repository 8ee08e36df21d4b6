"""Prefect flow ``instances_run``: ingest -> instance segmentation -> export -> object-level
evaluation (and, when ``segment.method`` is not ``none``, the semantic stages as well).

A thin adapter over :mod:`pipeline.instance_stages` and :mod:`pipeline.stages`: tasks are
whole stages passing paths; the per-chunk work runs on the Dask cluster of ``config.dask``.
``tileseg run CONFIG`` runs this flow when the config has an ``instances`` section.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.landcover import evaluate_task, publish_artifacts, segment_task, stitch_task
from flows.retry import io_retry_options
from pipeline import instance_stages
from pipeline.cluster import dask_client
from pipeline.config import RunConfig, absolute_paths, check_scorable
from pipeline.errors import ConfigError
from pipeline.report import console_table
from pipeline.resume import check_run_outputs


@task(name="ingest", cache_policy=NO_CACHE, **io_retry_options())
def ingest_task(config: RunConfig) -> Path:
    return instance_stages.ingest_inputs(config.inputs, config.store_path, config.ingest, config.microscopy,
                                         config.dask.progress, overwrite=config.overwrite)  # fmt: skip


@task(name="instances", cache_policy=NO_CACHE)
def instances_task(store: Path, config: RunConfig) -> Path:
    assert config.instances is not None
    return instance_stages.segment_instances(store, config.instances, config.dask.progress)


@task(name="export", cache_policy=NO_CACHE, **io_retry_options())
def export_task(store: Path, config: RunConfig) -> dict[str, Path]:
    assert config.instances is not None
    return instance_stages.export_instances(store, config.output_dir, config.instances, config.dask.progress,
                                            config.config_hash())  # fmt: skip


@task(name="evaluate-objects", cache_policy=NO_CACHE, **io_retry_options())
def evaluate_objects_task(store: Path, config: RunConfig) -> instance_stages.InstanceEvaluation:
    assert config.evaluate.instances is not None
    return instance_stages.evaluate_instances(store, config.evaluate.instances, config.output_dir,
                                              config.dask.progress, config.config_hash())  # fmt: skip


@task(name="panoptic", cache_policy=NO_CACHE, **io_retry_options())
def panoptic_task(store: Path, config: RunConfig) -> Path:
    assert config.instances is not None
    instance_stages.panoptic_labels(store, config.instances, config.dask.progress)
    return instance_stages.export_panoptic_cog(store, config.output_dir / "panoptic.tif", config.dask.progress,
                                               config.config_hash())  # fmt: skip


@task(name="evaluate-panoptic", cache_policy=NO_CACHE, **io_retry_options())
def evaluate_panoptic_task(store: Path, config: RunConfig):
    assert config.instances is not None and config.evaluate.instances is not None
    return instance_stages.evaluate_panoptic(store, config.evaluate.ground_truth, config.evaluate.instances,
                                             config.instances, config.output_dir, config.dask.progress,
                                             config.config_hash())  # fmt: skip


def publish_object_artifacts(ev: instance_stages.InstanceEvaluation, run_name: str) -> None:
    """Object-level metrics as Prefect artifacts: a table per IoU threshold and the report."""
    per = ev.report["metrics"]["per_threshold"]
    rows = [{"IoU >": f"{t:.2f}", **{k: per[k][i] for k in ("tp", "fp", "fn", "precision", "recall", "f1", "ap", "pq")}}
            for i, t in enumerate(ev.report["metrics"]["thresholds"])]  # fmt: skip
    f1 = ev.report["metrics"]["f1_at_0.5"]
    create_table_artifact(key="object-metrics", table=rows,
                          description=f"Object-level metrics of {run_name}; F1 at IoU 0.5: {f1}")  # fmt: skip
    create_markdown_artifact(key="object-report", markdown=ev.md_path.read_text(),
                             description=f"Object-level evaluation of {run_name}")  # fmt: skip


@flow(name="instances_run", log_prints=True)
def instances_run(config: RunConfig) -> dict[str, str]:
    """Instance segmentation run for one config; returns the output paths."""
    if config.instances is None:
        raise ConfigError("instances_run needs an `instances` section in the config")
    config = absolute_paths(config)  # Dask workers may run in another directory
    check_scorable(config)
    check_run_outputs(config)  # another run's outputs: refused before anything is written
    logger = get_run_logger()
    outputs: dict[str, str] = {}
    with dask_client(config.dask):
        store = ingest_task(config)
        outputs["store"] = str(store)
        if config.segment.method != "none":  # a semantic map too (panoptic runs)
            store = segment_task(store, config)
            outputs["cog"] = str(stitch_task(store, config))
        store = instances_task(store, config)
        outputs.update({k: str(v) for k, v in export_task(store, config).items()})
        if config.segment.method != "none":
            outputs["panoptic_cog"] = str(panoptic_task(store, config))
            if config.evaluate.ground_truth is not None and config.evaluate.instances is not None:
                pq = evaluate_panoptic_task(store, config)
                outputs["panoptic_report"] = str(config.output_dir / "report_panoptic.md")
                create_markdown_artifact(key="panoptic-quality", markdown=pq.markdown(dict(enumerate(config.class_names()))),
                                         description=f"Panoptic quality per class of {config.name}")  # fmt: skip
                print(f"\npanoptic quality: PQ {pq.pq_all:.4f} (things {pq.pq_things:.4f}), SQ {pq.sq_all:.4f}, "
                      f"RQ {pq.rq_all:.4f}")
        if config.evaluate.ground_truth is not None and config.segment.method != "none":
            result = evaluate_task(Path(outputs["cog"]), config)
            outputs.update(result.paths())
            publish_artifacts(result, config.name)
            print("\n" + console_table(result.report))
        if config.evaluate.instances is not None:
            ev = evaluate_objects_task(store, config)
            outputs.update(ev.paths())
            publish_object_artifacts(ev, config.name)
            print("\n" + ev.console())
    for k, v in outputs.items():
        logger.info("%s: %s", k, v)
    return outputs
