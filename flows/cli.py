"""The ``tileseg`` console script: the library's stage commands plus ``run`` (the Prefect flow)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import ConfigOpt, SetOpt, app, guarded, load

__all__ = ["app"]


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML run config, e.g. config/default.yaml.")],
    set_: SetOpt = None,
) -> None:
    """Run the whole flow (ingest -> segment -> stitch -> evaluate) as the Prefect flow `landcover_run`."""
    cfg = guarded(lambda: load(config, set_))
    # No telemetry from an offline machine; set here, at the process edge, not at import.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # tileseg's log records go through Prefect's handlers (console and the run's logs in the UI)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tileseg")
    logging.getLogger("tileseg").handlers.clear()
    from flows.landcover import landcover_run

    outputs = guarded(lambda: landcover_run(cfg))
    for k, v in outputs.items():
        typer.echo(f"{k}: {v}")


_ = ConfigOpt  # re-exported option type, kept for subcommands added here later


if __name__ == "__main__":  # python -m flows.cli
    app()
