"""Deployments against a REAL Prefect server: the session's (Prefect's test harness runs the
app of `prefect server start`, `prefect.server.api.server:create_app`, under uvicorn in a
subprocess) and `tileseg deploy` as a subprocess (started once for this module, always
stopped); runs are triggered through the API the way the UI's "Custom run" form does
(`run_deployment`)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from pipeline.config import load_config, validate_config
from pipeline.errors import ConfigError
from tests import synth

BANDS = ["B02", "B03", "B04", "B08"]
DEPLOYMENT = "landcover_run/tiny-nightly"
STARTUP_S = 180  # generous: the CI machine is shared


# --------------------------------------------------------------------------- no server needed
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A 120 x 150 px (y, x) 4-band uint16 scene with a 3 px nodata (0) collar, its ground
    truth, and a run config (threshold on B03, Otsu) with a deploy section."""
    d = tmp_path_factory.mktemp("tiny")
    classes = synth.class_map(120, 150, n_classes=2, seed=0)
    image = synth.bands_from_classes(classes, n_bands=4, seed=1, nodata_collar=3)
    synth.write_tif(d / "scene.tif", image, nodata=0, names=BANDS)
    synth.write_tif(d / "gt.tif", classes, nodata=255)
    cfg = {
        "name": "tiny",
        "inputs": [str(d / "scene.tif")],
        "output_dir": str(d / "out-default"),
        "classes": ["low", "high"],
        "ingest": {"chunk_size": 64},
        "segment": {"method": "threshold", "threshold": {"expression": "B03"}},
        "evaluate": {"ground_truth": {"path": str(d / "gt.tif")}, "report": {"checksums": False}},
        "dask": {"processes": False, "n_workers": 1, "progress": False},
        "deploy": {"name": "tiny-nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin", "tags": ["test"]},
    }
    (d / "run.yaml").write_text(yaml.safe_dump(cfg))
    return {"dir": d, "image": image, "config": d / "run.yaml"}


def test_schedule_from_config_and_command_line(tiny):
    from flows.deploy import settings

    cfg = load_config(tiny["config"])
    s = settings(cfg)
    assert (s.name, s.cron, s.timezone, s.tags) == ("tiny-nightly", "0 3 * * *", "Europe/Berlin", ("test",))
    s = settings(cfg, name="adhoc", cron="30 6 * * 1-5", timezone="UTC")
    assert (s.name, s.cron, s.timezone) == ("adhoc", "30 6 * * 1-5", "UTC")
    assert settings(load_config(None)).name == "tileseg-run" and settings(load_config(None)).cron is None
    with pytest.raises(ConfigError, match=r"deploy\.cron.*61 \* \* \* \*"):
        settings(cfg, cron="61 * * * *")
    with pytest.raises(ConfigError, match=r"deploy\.timezone.*Mars/Olympus"):
        load_config(tiny["config"], ["deploy.timezone=Mars/Olympus"])


def test_deployments_carry_the_config_and_the_schedule(tiny):
    from flows.deploy import build_deployments, settings

    cfg = load_config(tiny["config"])
    (lc,) = build_deployments(cfg, settings(cfg))  # no `train` section: landcover_run only
    assert (lc.flow_name, lc.name, lc.entrypoint) == ("landcover_run", "tiny-nightly", "flows.landcover.landcover_run")
    assert lc.enforce_parameter_schema
    assert [(s.schedule.cron, s.schedule.timezone) for s in lc.schedules] == [("0 3 * * *", "Europe/Berlin")]
    assert "deploy" not in lc.parameters["config"]  # scheduling is not a run parameter
    assert validate_config(lc.parameters["config"]) == cfg.model_copy(update={"deploy": None})

    box = {"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1}
    train = {"train_area": box, "val_area": box}
    cfg = load_config(tiny["config"], [f"train={train}"])
    lc, tr = build_deployments(cfg, settings(cfg))
    assert tr.flow_name == "train_run" and tr.entrypoint == "flows.train.train_run"
    assert lc.schedules and not tr.schedules  # training runs on demand only


def test_committed_prefect_yaml_matches_the_default_config(repo_root):
    from flows.deploy import prefect_yaml, settings

    cfg = load_config(repo_root / "config" / "default.yaml")
    committed = yaml.safe_load((repo_root / "prefect.yaml").read_text())
    assert committed == prefect_yaml(cfg, settings(cfg)), (
        "prefect.yaml is out of date: run `tileseg deploy config/default.yaml --prefect-yaml prefect.yaml`"
    )
    for d in committed["deployments"]:
        module, func = d["entrypoint"].split(":")
        assert (repo_root / module).is_file() and f"def {func}(" in (repo_root / module).read_text()
        validate_config(d["parameters"]["config"])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def test_deploy_without_a_server_says_how_to_start_one(tiny, tmp_path):
    p = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", str(tiny["config"])], capture_output=True,
                       text=True, env=_env(PREFECT_HOME=str(tmp_path)), timeout=120)  # fmt: skip
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: tileseg deploy needs a Prefect server")


# --------------------------------------------------------------------------- a real server
def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started (a graceful shutdown), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def server(prefect_home):
    """The session's Prefect server (conftest's ``prefect_home``: Prefect's test harness runs
    the API that `prefect server start` runs, in a subprocess on a free port, with its own
    SQLite database), and the environment that points subprocesses at it. One server for the
    whole session: each start costs about 20 s here."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url and url.startswith("http://127.0.0.1"), url
    return {"url": url, "env": _env(PREFECT_HOME=str(prefect_home), PREFECT_API_URL=url), "home": prefect_home}


@pytest.fixture()
def api(server):
    """This test process's Prefect client settings pointed at the module's server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server["url"], PREFECT_HOME: server["home"]}):
        yield server


@pytest.fixture(scope="module")
def served(server, tiny):
    """`tileseg deploy` serving the tiny config, started in the config's directory."""
    log = tiny["dir"] / "serve.log"
    env = dict(server["env"], PREFECT_RUNNER_POLL_FREQUENCY="1")  # pick up new runs within a second
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", str(tiny["config"])], cwd=tiny["dir"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        deadline = time.monotonic() + STARTUP_S
        with temporary_settings(updates={PREFECT_API_URL: server["url"], PREFECT_HOME: server["home"]}):
            with get_client(sync_client=True) as client:
                while "Your deployments are being served" not in log.read_text():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"tileseg deploy did not start serving:\n{_tail(log)}")
                    time.sleep(0.5)
                deployment = client.read_deployment_by_name(DEPLOYMENT)
        yield {"deployment": deployment, "log": log}
    finally:
        _stop(proc)


def _params(served) -> dict:
    return copy.deepcopy(served["deployment"].parameters)


def test_the_deployment_is_registered_with_schedule_and_defaults(api, served, tiny):
    d = served["deployment"]
    assert d.entrypoint == "flows.landcover.landcover_run" and d.enforce_parameter_schema
    assert [(s.schedule.cron, s.schedule.timezone) for s in d.schedules] == [("0 3 * * *", "Europe/Berlin")]
    assert validate_config(d.parameters["config"]) == load_config(tiny["config"]).model_copy(update={"deploy": None})
    # the UI's run form is RunConfig's JSON schema, which refuses unknown keys and keeps the bounds
    schema = d.parameter_openapi_schema
    assert schema["required"] == ["config"]
    assert schema["definitions"]["RunConfig"]["additionalProperties"] is False
    assert schema["definitions"]["UNetConfig"]["properties"]["overlap"]["maximum"] == 0.875


def test_a_run_with_overridden_parameters_completes_with_its_outputs_and_artifacts(api, served, tiny):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    b03 = tiny["image"][BANDS.index("B03")].astype(np.float64)
    value = float(np.percentile(b03[b03 > 0], 30))  # far from Otsu's threshold on this bimodal band
    cfg = _params(served)["config"]
    cfg["output_dir"] = str(tiny["dir"] / "out-ui")
    cfg["segment"]["threshold"]["value"] = value
    run = run_deployment(DEPLOYMENT, parameters={"config": cfg}, timeout=300)
    assert run.state.is_completed(), f"{run.state}\n{_tail(served['log'])}"

    # the outputs went to the overridden directory and used the overridden threshold
    with rasterio.open(tiny["dir"] / "out-ui" / "labels.tif") as cog:
        labels = cog.read(1)
    expected = np.where(b03 == 0, 255, (b03 > value).astype(np.uint8))  # 0 is the image's nodata
    np.testing.assert_array_equal(labels, expected)
    assert (tiny["dir"] / "out-ui" / "report.json").is_file()
    assert not (tiny["dir"] / "out-default").exists()

    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))}  # fmt: skip
    assert {"run-summary", "iou-table", "aggregate-metrics", "excluded-pixels", "iou-report"} <= set(arts)
    summary = arts["run-summary"].data
    assert str(tiny["dir"] / "out-ui" / "labels.tif") in summary
    assert f"| 1 | high | {int((expected == 1).sum()):,} |" in summary


def test_a_parameter_out_of_bounds_is_refused_naming_the_field(api, served):
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    cfg = _params(served)["config"]
    cfg["segment"]["unet"]["overlap"] = 2
    refused = r"'config\.segment\.unet\.overlap'.*2 is greater than the maximum of 0\.875"
    with pytest.raises(PrefectHTTPStatusError, match=refused):
        run_deployment(DEPLOYMENT, parameters={"config": cfg}, timeout=0)
    cfg = _params(served)["config"]
    cfg["segment"]["thresold"] = {"value": 1}  # a typo: unknown key
    with pytest.raises(PrefectHTTPStatusError, match=r"'config\.segment'.*'thresold' was unexpected"):
        run_deployment(DEPLOYMENT, parameters={"config": cfg}, timeout=0)


def test_an_inconsistent_config_fails_the_run_at_its_start_naming_the_field(api, served, tiny):
    from prefect.deployments import run_deployment

    cfg = _params(served)["config"]
    cfg["output_dir"] = str(tiny["dir"] / "out-never")
    cfg["segment"]["method"] = "unet"  # valid by the JSON schema, but unet needs a model (a model validator)
    run = run_deployment(DEPLOYMENT, parameters={"config": cfg}, timeout=300)
    assert run.state.is_failed()
    assert "config.segment" in run.state.message and "segment.unet.model" in run.state.message
    assert not (tiny["dir"] / "out-never").exists()


def test_a_failing_cli_run_prints_one_line_and_the_server_keeps_the_traceback(api, tiny, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    missing = tmp_path / "no-such-scene.tif"
    cmd = [sys.executable, "-m", "flows.cli", "run", str(tiny["config"]), "--set", f"inputs=[{missing}]",
           "--set", f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=api["env"], timeout=300)
    assert p.returncode == 1
    assert "Traceback" not in p.stdout + p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"error: input raster not found: {missing}"

    # the run's state and logs on the server keep the error and its traceback for UI users
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=20)
        (run,) = [r for r in runs if r.state and r.state.is_failed() and str(missing) in (r.state.message or "")]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    text = "\n".join(log.message for log in logs)
    assert "Traceback" in text and "MissingFileError" in text
    assert "Retry 1/" not in text  # a missing file is not retried


def test_prefect_deploy_registers_the_committed_prefect_yaml(api, repo_root):
    from prefect.client.orchestration import get_client

    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    env = dict(api["env"], PWD=str(repo_root))  # `{{ $PWD }}` in the pull step
    for cmd in (["work-pool", "create", "tileseg", "--type", "process"], ["deploy", "--all"]):
        p = subprocess.run(prefect + cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
    expected = load_config(repo_root / "config" / "default.yaml").model_dump(mode="json")
    with get_client(sync_client=True) as client:
        for flow in ("landcover_run", "train_run"):
            d = client.read_deployment_by_name(f"{flow}/eobox-nightly")
            assert d.work_pool_name == "tileseg" and d.parameters == {"config": expected}
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo_root)}}]
            assert [s.schedule.cron for s in d.schedules] == (["0 3 * * *"] if flow == "landcover_run" else [])
