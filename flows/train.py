"""Prefect flow ``train_run``: ingest (if needed) -> train, a thin adapter over :mod:`pipeline.stages`."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.retry import io_retry_options
from pipeline import instance_stages, stages
from pipeline.cluster import dask_client
from pipeline.config import RunConfig, absolute_paths
from pipeline.errors import ConfigError
from pipeline.segment.unet import load_spec


@task(name="ingest", cache_policy=NO_CACHE, **io_retry_options())  # reads inputs: retried on transient I/O errors
def ingest_inputs(config: RunConfig) -> Path:
    """The store of the config's inputs: reused when up to date, re-ingested when they changed,
    another run's refused (without ``overwrite``); microscopy images are always re-read."""
    return instance_stages.ingest_inputs(config.inputs, config.store_path, config.ingest, config.microscopy,
                                         config.dask.progress, overwrite=config.overwrite)  # fmt: skip


@task(name="train", cache_policy=NO_CACHE)
def train_task(store: Path, config: RunConfig) -> Path:
    assert config.train is not None and config.evaluate.ground_truth is not None
    return stages.train(store, config.train, config.evaluate.ground_truth, config.classes, config.dask.progress)


@flow(name="train_run", log_prints=True)
def train_run(config: RunConfig) -> str:
    """Train the model described by ``config.train``; returns the saved model's path."""
    if config.train is None or config.evaluate.ground_truth is None:
        raise ConfigError("training needs a `train` section and evaluate.ground_truth in the config")
    config = absolute_paths(config)  # Dask workers may run in another directory
    with dask_client(config.dask):
        model = train_task(ingest_inputs(config), config)
    spec = load_spec(model)
    score = ("loss", "best_val_loss") if spec.arch == "maskrcnn" else ("mIoU", "best_val_miou")
    create_markdown_artifact(
        key="training",
        markdown=(
            f"# Model `{model}`\n\n- architecture: {spec.arch} / {spec.encoder} (depth {spec.encoder_depth})\n"
            f"- target: {spec.target}\n"
            f"- bands: {', '.join(spec.bands)}\n- best validation {score[0]}: {spec.trained.get(score[1])}"
            f" at epoch {spec.trained.get('best_epoch')} of {spec.trained.get('epochs_run')}\n"
        ),
        description="Training result",
    )
    return str(model)
