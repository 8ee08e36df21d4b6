"""Prefect deployments of tileseg's flows, served from one process (``tileseg deploy``).

``tileseg deploy CONFIG`` registers one deployment per served flow with a Prefect
server and then runs them when they are due (Prefect's ``serve``: the serving process
is the worker, no work pool is needed). Each deployment carries the run config as its
default parameters, so the Prefect UI's "Custom run" form opens pre-filled with the
config, every field of which can be edited; ``landcover_run`` also gets the config's
cron schedule. Why ``serve`` rather than ``prefect deploy`` + a work pool: the flows
need the tileseg environment (GDAL, torch, the input files), which the serving process
has; ``prefect.yaml`` (written by :func:`prefect_yaml`) is there for teams that use
work pools.

Parameters are validated twice, both times by the pydantic config: the Prefect server
checks a new run's parameters against the flow's JSON schema (generated from
:class:`~pipeline.config.RunConfig`: types, bounds, unknown keys) and refuses the run
with ``Validation failed for field 'config.segment.unet.overlap'...``; what the JSON
schema cannot express (the config's cross-field checks) fails the run when it starts,
with Prefect's ``Flow run received invalid parameters: - config.<field>: ...``.

To serve another flow (a microscopy flow, say), add a :class:`ServedFlow` to
:data:`SERVED`. A served flow takes the run config as its one parameter, ``config``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.config import RunConfig
from pipeline.errors import ConfigError, TilesegError

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

class ServerError(TilesegError, ConnectionError):
    """No Prefect server is configured, or it does not answer."""


@dataclass(frozen=True)
class ServedFlow:
    """A flow that ``tileseg deploy`` serves.

    Attributes:
        entrypoint: ``module.flow_function`` (imported only when deploying).
        scheduled: whether the config's cron schedule applies (False: ad-hoc runs only).
        applies: whether the flow makes sense for a config (e.g. training needs ``train``).
    """

    entrypoint: str
    scheduled: bool
    applies: Callable[[RunConfig], bool]

    def load(self) -> Any:
        """The Prefect ``Flow`` object."""
        module, attr = self.entrypoint.rsplit(".", 1)
        return getattr(importlib.import_module(module), attr)


def _semantic(cfg: RunConfig) -> bool:
    return cfg.instances is None


def _instances(cfg: RunConfig) -> bool:
    return cfg.instances is not None


def _trainable(cfg: RunConfig) -> bool:
    return cfg.train is not None and cfg.evaluate.ground_truth is not None


#: Flows served by ``tileseg deploy``, in this order.
SERVED: tuple[ServedFlow, ...] = (
    ServedFlow("flows.landcover.landcover_run", scheduled=True, applies=_semantic),
    ServedFlow("flows.instances.instances_run", scheduled=True, applies=_instances),
    ServedFlow("flows.train.train_run", scheduled=False, applies=_trainable),
)


@dataclass(frozen=True)
class DeploySettings:
    """Name, schedule and tags of the deployments, from the config's ``deploy`` section
    and the command line (which wins)."""

    name: str
    cron: str | None
    timezone: str
    tags: tuple[str, ...]


def settings(cfg: RunConfig, name: str | None = None, cron: str | None = None,
             timezone: str | None = None) -> DeploySettings:  # fmt: skip
    """Merge ``cfg.deploy`` with command-line overrides; check the cron expression and time zone.

    Raises:
        ConfigError: an invalid cron expression (five fields, crontab(5)) or time zone;
            the message names the ``deploy.*`` key.
    """
    d = cfg.deploy
    s = DeploySettings(
        name=name or (d.name if d and d.name else cfg.name),
        cron=cron if cron is not None else (d.cron if d else None),
        timezone=timezone or (d.timezone if d else "UTC"),
        tags=tuple(d.tags) if d else (),
    )
    if s.cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=s.cron, timezone=s.timezone)
        except ValidationError as exc:
            problems = "; ".join(f"deploy.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid schedule: {problems}") from None
    return s


def default_parameters(cfg: RunConfig) -> dict[str, Any]:
    """The deployment's default parameters: the whole config as JSON (``deploy`` left out),
    as the UI's run form shows it. Relative paths stay relative to the serving process's
    working directory."""
    return {"config": cfg.model_dump(mode="json")}


def build_deployments(cfg: RunConfig, s: DeploySettings) -> list[RunnerDeployment]:
    """One Prefect ``RunnerDeployment`` per applicable flow in :data:`SERVED`, named
    ``FLOW/<s.name>``, with the config as default parameters and, for scheduled flows,
    the cron schedule. Parameter schema enforcement is on (see the module docstring)."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    params = default_parameters(cfg)
    out = []
    for served in SERVED:
        if not served.applies(cfg):
            continue
        schedule = Cron(s.cron, timezone=s.timezone) if served.scheduled and s.cron else None
        out.append(
            served.load().to_deployment(
                name=s.name,
                schedule=schedule,
                parameters=params,
                tags=list(s.tags),
                enforce_parameter_schema=True,
                # `module.flow`, importable wherever tileseg is installed, whatever the working directory
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return out


def check_server() -> str:
    """The configured Prefect API URL, after checking that the server answers.

    Raises:
        ServerError: ``PREFECT_API_URL`` is not set (``serve`` needs a lasting server, not
            Prefect's temporary one) or the server does not answer its health check.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ServerError(
            "tileseg deploy needs a Prefect server: start one with `prefect server start` "
            "and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise ServerError(f"the Prefect server at {url} does not answer ({problem}); is `prefect server start` up?")
    return url


def serve(deployments: list[RunnerDeployment], limit: int | None = None) -> None:
    """Register the deployments and run their flow runs until interrupted (Ctrl-C or SIGTERM;
    their schedules are paused on shutdown)."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments, limit=limit, print_starting_message=True)


def prefect_yaml(cfg: RunConfig, s: DeploySettings, work_pool: str = "tileseg") -> dict[str, Any]:
    """A ``prefect.yaml`` project (as a mapping) with the same deployments as
    :func:`build_deployments`, for ``prefect deploy --all`` and a process worker
    (``prefect worker start --pool <work_pool>``) started in the tileseg environment.

    The pull step runs the flows in the directory ``prefect deploy`` is run from
    (``{{ $PWD }}``, resolved at deploy time), so relative config paths keep working.
    """
    params = default_parameters(cfg)  # one object: YAML writes it once and refers to it (&id001 / *id001)
    deployments = []
    for served in SERVED:
        if not served.applies(cfg):
            continue
        module, func = served.entrypoint.rsplit(".", 1)
        d: dict[str, Any] = {
            "name": s.name,
            "entrypoint": f"{Path(*module.split('.'))}.py:{func}",
            "tags": list(s.tags),
            "parameters": params,
            "enforce_parameter_schema": True,
            "work_pool": {"name": work_pool},
        }
        if served.scheduled and s.cron:
            d["schedules"] = [{"cron": s.cron, "timezone": s.timezone}]
        deployments.append(d)
    return {
        "name": "tileseg",
        "prefect-version": "3.9",
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}],
        "deployments": deployments,
    }
