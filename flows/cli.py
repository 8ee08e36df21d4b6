"""The ``tileseg`` console script: the library's stage commands plus ``run`` (the Prefect
flow) and ``deploy`` (Prefect deployments served from this process)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli import ConfigOpt, OverwriteOpt, SetOpt, app, debug_enabled, guarded, load
from pipeline.config import check_scorable

__all__ = ["app"]


class _WithoutTraceback(logging.Formatter):
    """Formats a record like ``inner`` does, but without its traceback.

    Works on a copy of the record, so the other handlers (Prefect's API handler, which
    sends the run's logs, tracebacks included, to the server and its UI) still get it whole.
    """

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = copy.copy(record)
            record.exc_info = record.exc_text = record.stack_info = None
        return self.inner.format(record)


def _console_without_tracebacks() -> None:
    """Drop tracebacks from Prefect's console log handler (the CLI prints the error in
    one line instead); the run's logs on the Prefect server keep them."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter))


#: Seconds `tileseg run` waits for Prefect's temporary API server to start (Prefect's default: 20).
EPHEMERAL_STARTUP_TIMEOUT_S = 90


def _prefect_env() -> None:
    # At the process edge, never at import: no telemetry from an offline machine, and
    # tileseg's log records go through Prefect's handlers (console and the run's logs in
    # the UI), also in the flow-run processes that `deploy` starts (they inherit this).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tileseg")
    # Prefect waits 20 s for its temporary API server (`tileseg run` without PREFECT_API_URL);
    # on a loaded 2-core machine it took longer, and the run failed before it began.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    logging.getLogger("tileseg").handlers.clear()


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML run config, e.g. config/default.yaml.")],
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run the whole flow as a Prefect flow: `landcover_run` (ingest -> segment -> stitch ->
    evaluate), or `instances_run` when the config has an `instances` section.

    Rerunning the same command after a crash reuses the store and the finished chunks."""
    cfg = guarded(lambda: load(config, set_, overwrite))
    guarded(lambda: check_scorable(cfg))  # before Prefect's server starts (the flows check it too)
    _prefect_env()
    if cfg.instances is not None:
        from flows.instances import instances_run as run_flow
    else:
        from flows.landcover import landcover_run as run_flow

    if not debug_enabled():
        _console_without_tracebacks()
    outputs = guarded(lambda: run_flow(cfg))
    for k, v in outputs.items():
        typer.echo(f"{k}: {v}")


@app.command()
def deploy(
    config: Annotated[Path, typer.Argument(help="YAML run config: the deployments' default parameters.")],
    set_: SetOpt = None,
    cron: Annotated[str | None, typer.Option(help="Cron schedule of landcover_run (default: deploy.cron).")] = None,
    name: Annotated[str | None, typer.Option(help="Deployment name (default: deploy.name, else the run name).")] = None,
    timezone: Annotated[str | None, typer.Option(help="Time zone of the schedule (default: deploy.timezone).")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many flow runs at a time.")] = None,
    prefect_yaml: Annotated[
        Path | None, typer.Option(help="Write these deployments as a prefect.yaml for `prefect deploy` and exit.")
    ] = None,
) -> None:
    """Serve landcover_run (on the config's cron schedule) and train_run (when the config can train)
    as Prefect deployments with the config as default parameters, until Ctrl-C.

    Needs a Prefect server (`prefect server start`) and PREFECT_API_URL pointing at it. Runs
    start in this process's working directory, so relative config paths resolve against it.
    """
    cfg = guarded(lambda: load(config, set_, absolute=False))  # as written: the parameters a UI user edits
    _prefect_env()
    from flows import deploy as dep

    s = guarded(lambda: dep.settings(cfg, name, cron, timezone))
    if prefect_yaml is not None:
        import yaml

        text = yaml.safe_dump(dep.prefect_yaml(cfg, s), sort_keys=False, width=120)
        header = (
            f"# Written by `tileseg deploy {config} --prefect-yaml {prefect_yaml}`; edit the config, not this file.\n"
            "# From the repository root: `prefect work-pool create tileseg --type process`, `prefect deploy --all`,\n"
            "# then `prefect worker start --pool tileseg` in the tileseg environment.\n"
        )
        guarded(lambda: prefect_yaml.write_text(header + text))
        typer.echo(f"wrote {prefect_yaml}: `prefect deploy --all` registers its deployments")
        return
    url = guarded(dep.check_server)
    deployments = guarded(lambda: dep.build_deployments(cfg, s))
    schedule = f"cron '{s.cron}' ({s.timezone})" if s.cron else "no schedule (ad-hoc runs only)"
    typer.echo(f"serving {', '.join(f'{d.flow_name}/{d.name}' for d in deployments)} on {url}; "
               f"landcover_run: {schedule}; working directory {Path.cwd()}")  # fmt: skip
    if not debug_enabled():
        _console_without_tracebacks()
    guarded(lambda: dep.serve(deployments, limit))


_ = ConfigOpt  # re-exported option type, kept for subcommands added here later


if __name__ == "__main__":  # `python -m flows.cli ...`
    app()
