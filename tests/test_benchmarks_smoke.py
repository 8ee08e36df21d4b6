"""A tiny run of each benchmark script, so that they cannot rot (the real runs are `make bench`)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_unet_vs_monai_benchmark_smoke(repo_root, tmp_path):
    from pipeline.io.sample import fetch_sample

    fetch_sample(repo_root / "data" / "cache")
    out = tmp_path / "bench.jsonl"
    r = subprocess.run(
        [sys.executable, "tests/benchmarks/bench_unet_monai.py", "--smoke", "--device", "cpu", "--results", str(out)],
        cwd=repo_root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["shape"] == [300, 400]
    assert row["tileseg_mpx_s"] > 0 and row["monai_mpx_s"] > 0
    assert 0.9 < row["label_agreement"] <= 1.0  # same model, window and overlap; edges and grids differ
