"""Retries of the I/O stages: only transient OSErrors, with exponential backoff."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from flows.retry import IO_RETRIES, is_transient, retry_on_io_error
from pipeline.config import RunConfig
from pipeline.errors import ConfigError, DataFetchError, InputError, MissingFileError, RasterIOError, io_failure


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (RasterIOError("reading scene.tif window (0, 0) failed: timeout"), True),
        (OSError(5, "Input/output error"), True),
        (TimeoutError("read timed out"), True),
        (ConnectionResetError("connection reset by peer"), True),
        (DataFetchError("checksum mismatch"), True),
        (MissingFileError("input raster not found: scene.tif"), False),
        (FileNotFoundError("scene.tif"), False),
        (PermissionError("outputs/ is read-only"), False),
        (io_failure("writing", "out.tif", OSError(errno.ENOSPC, "No space left on device")), False),
        (io_failure("writing", "out.tif", OSError(errno.EFBIG, "File too large")), False),
        (io_failure("writing", "out.tif", OSError(errno.EIO, "Input/output error")), True),
        (ConfigError("invalid config: segment.unet.overlap"), False),
        (InputError("expression uses bands the raster lacks"), False),
        (ValueError("bad value"), False),
        (RuntimeError("bug"), False),
        (None, False),
    ],
)
def test_only_transient_io_errors_are_retried(exc, retried):
    assert is_transient(exc) is retried


def test_the_retry_condition_reads_the_exception_of_the_failed_state():
    from prefect.states import Failed

    assert retry_on_io_error(None, None, Failed(data=RasterIOError("cannot write labels.tif: disk quota")))
    assert not retry_on_io_error(None, None, Failed(data=ConfigError("invalid config")))
    assert not retry_on_io_error(None, None, Failed(data=MissingFileError("input raster not found")))


def test_io_stages_retry_with_doubling_delays_and_compute_stages_do_not():
    from flows import landcover, train

    for t in (landcover.ingest_task, landcover.stitch_task, landcover.evaluate_task, train.ingest_inputs):
        assert t.retries == IO_RETRIES >= 1 and t.retry_condition_fn is retry_on_io_error, t.name
        delays = t.retry_delay_seconds
        assert len(delays) == IO_RETRIES and delays[0] > 0
        assert all(b == 2 * a for a, b in zip(delays, delays[1:])), delays
    for t in (landcover.segment_task, landcover.summary_task, train.train_task):
        assert t.retries == 0, t.name


def test_a_transient_error_is_retried_and_a_config_error_is_not(prefect_home, monkeypatch):
    from prefect import flow

    from flows import landcover

    task = landcover.ingest_task.with_options(retry_delay_seconds=0)  # same condition, no waiting

    @flow
    def one_stage(config: RunConfig) -> Path:
        return task(config)

    calls: list[str] = []

    def flaky(*args, **kwargs):
        calls.append("flaky")
        if len(calls) < 3:
            raise RasterIOError("reading scene.tif window (0, 0) failed: timed out")
        return Path("scene.zarr")

    monkeypatch.setattr(landcover.stages, "ingest", flaky)
    assert one_stage(RunConfig()) == Path("scene.zarr")
    assert len(calls) == 3

    def bad(*args, **kwargs):
        calls.append("bad")
        raise ConfigError("invalid config: ingest.chunk_size")

    calls.clear()
    monkeypatch.setattr(landcover.stages, "ingest", bad)
    with pytest.raises(ConfigError, match="ingest.chunk_size"):
        one_stage(RunConfig())
    assert calls == ["bad"]


def test_a_gdal_write_error_on_a_nearly_full_disk_says_so(tmp_path, monkeypatch):
    """GDAL's message on a full disk can be only `TIFFRewriteDirectory:Error fetching
    directory count`: the hint then comes from the free space of the output's disk."""
    import shutil
    from collections import namedtuple

    gdal = RuntimeError("TIFFRewriteDirectory:Error fetching directory count")
    usage = namedtuple("usage", "total used free")
    out = tmp_path / "new" / "labels.tif"  # its folder does not exist yet: the nearest parent's disk
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    assert "free disk space" in str(io_failure("writing COG", out, gdal))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**9, 10**12 - 10**9))
    assert "check the path, free space and permissions" in str(io_failure("writing COG", out, gdal))
