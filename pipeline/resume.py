"""Safe to interrupt and repeat: what a rerun reuses, what it redoes, and what it refuses.

Every output records what made it, and a rerun compares that record with its own:

- **Store (ingest).** The store's root attribute ``tileseg_ingest`` is a manifest: each
  input's absolute path, size in bytes and modification time (``mtime_ns``), and the
  ingest config hash. Same manifest: the store is reused (logged). Same input paths but
  another size or mtime, or another ingest config: the store is stale and is re-ingested.
  Other input paths (or a store without a manifest): the store belongs to another run and
  is refused unless ``overwrite``. Size + mtime, not a content hash: hashing the inputs
  (gigabytes of JPEG2000) would cost a full read on every rerun, while any rewrite of a
  file changes its mtime; the one blind spot (a file edited in place and given back its
  old size and mtime, as ``touch -r`` can) is what ``--overwrite`` is for.
- **Labels (segment).** A *segment key* hashes the segment config, the parameters derived
  from the whole raster (Otsu threshold, k-means centroids, cluster-to-class mapping),
  the model file's SHA-256 (U-Net), whether probabilities are written, and the image's
  identity (its ``zarr.json`` and the store's manifest). ``labels`` carrying the same key
  are up to date and the stage does nothing. Otherwise chunks go to ``labels_partial``,
  which carries the key too: each task writes its zarr chunk and then a completion marker
  (``labels_partial/.chunks_done/<i>.<j>``, holding the key, written last). A rerun with
  the same key keeps ``labels_partial`` and builds tasks only for the chunks without a
  marker; another key discards it. ``labels_partial`` is renamed onto ``labels`` when
  every chunk is written. Deterministic kernels make a resumed result identical, byte for
  byte, to an uninterrupted one. The global parameters are derived again on a rerun (a
  pass over the raster), except the k-means fit itself: the labels record it with the
  hash of its sample (:func:`kmeans_fit_id`), and a rerun that draws the same sample
  takes the recorded centroids.
- **COG (stitch).** Tags ``TILESEG_RUN`` (the run config hash, or a hash of the stitch
  settings for a bare ``stitch``) and ``TILESEG_LABELS`` (the segment key of the labels it
  shows). Both equal: up to date, nothing to do. Same run, other labels: rewritten.
  Another run (or a file tileseg did not write): refused unless ``overwrite``.
- **Reports (evaluate).** ``report.json``'s ``config_hash``: the same hash is a rerun of
  this run (the reports are recomputed and replaced); another hash is refused unless
  ``overwrite``.

``overwrite`` (``--overwrite``) both allows replacing another run's outputs and forces
every stage to recompute instead of reusing. The run config hash leaves out ``dask`` and
``overwrite``, which change no output (:meth:`pipeline.config.RunConfig.config_hash`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline import apply
from pipeline.cluster import compute
from pipeline.config import IngestConfig, RunConfig, SegmentConfig, config_hash
from pipeline.errors import OutputExistsError, RasterIOError
from pipeline.grid import Grid, column_strips
from pipeline.io import files
from pipeline.io import store as zstore
from pipeline.segment.classical import KMeansModel

log = logging.getLogger("tileseg")

#: Root attribute of a store holding its ingest manifest.
MANIFEST_ATTR = "tileseg_ingest"
#: COG tags naming the run that wrote it and the labels it shows.
OWNER_TAG, LABELS_TAG = "TILESEG_RUN", "TILESEG_LABELS"

_HOW = "pass --overwrite (or set overwrite: true) to replace it, or choose another path"


# --------------------------------------------------------------------------- ingest
def ingest_manifest(sources: list[str | Path], cfg: IngestConfig) -> dict[str, Any]:
    """The manifest of an ingest: each input's absolute path, size (bytes) and ``mtime_ns``
    (None for a path that is not a local file, such as ``/vsicurl/...``), and the ingest
    config hash."""
    inputs = []
    for src in sources:
        path = os.path.abspath(src) if "://" not in str(src) and not str(src).startswith("/vsi") else str(src)
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size = mtime = None
        inputs.append({"path": path, "size": size, "mtime_ns": mtime})
    return {"inputs": inputs, "ingest_config": config_hash(cfg)}


Verdict = Literal["same", "changed", "other"]


def compare_manifests(old: dict[str, Any] | None, new: dict[str, Any]) -> tuple[Verdict, str]:
    """How a store's manifest ``old`` relates to this run's ``new``, with the reason.

    Returns:
        ``("same", "")``; ``("changed", why)`` when the same input paths changed size or
        mtime (or cannot be checked), or the ingest config changed; ``("other", why)`` when
        the input paths differ or the store has no manifest.
    """
    if not old or "inputs" not in old:
        return "other", "it has no ingest manifest (tileseg did not write it, or an older version did)"
    old_paths = [i.get("path") for i in old["inputs"]]
    new_paths = [i["path"] for i in new["inputs"]]
    if old_paths != new_paths:
        return "other", f"it was ingested from other inputs ({', '.join(map(str, old_paths))})"
    changed = [n["path"] for o, n in zip(old["inputs"], new["inputs"])
               if n["size"] is None or (o.get("size"), o.get("mtime_ns")) != (n["size"], n["mtime_ns"])]  # fmt: skip
    if changed:
        return "changed", f"inputs changed since it was ingested: {', '.join(changed)}"
    if old.get("ingest_config") != new["ingest_config"]:
        return "changed", "the ingest config changed"
    return "same", ""


def store_verdict(store: Path, sources: list[str | Path], cfg: IngestConfig) -> tuple[Verdict | None, str]:
    """:func:`compare_manifests` for an existing zarr store at ``store``; ``(None, "")`` when there is none."""
    if not (Path(store) / "zarr.json").is_file():
        return None, ""
    old = zstore.read_root_attrs(store).get(MANIFEST_ATTR)
    return compare_manifests(old, ingest_manifest(sources, cfg))


def refuse_store(store: Path, why: str) -> OutputExistsError:
    """The error for a store that belongs to another run."""
    return OutputExistsError(f"the store {store} belongs to another run: {why}; {_HOW}")


# --------------------------------------------------------------------------- segment
def store_identity(store: Path) -> str:
    """``sha256:`` of the store's ``image/zarr.json`` (shape, chunks, dtype, band names, nodata)
    and its ingest manifest: a re-ingested image gets another identity."""
    meta = Path(store) / zstore.IMAGE / "zarr.json"
    try:
        image = files.sha256_file(meta)
    except OSError as exc:
        raise RasterIOError(f"cannot read {meta}: {exc}") from None
    return config_hash({"image": image, "manifest": zstore.read_root_attrs(store).get(MANIFEST_ATTR)})


def segment_key(store: Path, cfg: SegmentConfig, attrs: dict[str, Any], probabilities: bool,
                chunks: tuple[tuple[int, ...], ...]) -> str:  # fmt: skip
    """The key of a segment run (see the module docstring): equal keys give equal labels.

    Args:
        attrs: the labels' attributes, including the parameters derived from the whole raster.
        chunks: the labels' (y, x) chunks.
    """
    from pipeline import __version__

    model = None
    if cfg.method == "unet" and cfg.unet.model is not None:
        m = Path(cfg.unet.model)
        model = [files.checksum(m.with_suffix(".safetensors")), files.checksum(m.with_suffix(".json"))]
        model = [c["sha256"] for c in model]
    return config_hash({
        "segment": cfg.model_dump(mode="json"), "attrs": attrs, "model": model, "probabilities": probabilities,
        "chunks": [list(c) for c in chunks], "image": store_identity(store), "tileseg": __version__,
    })  # fmt: skip


#: Label attribute naming the k-means fit: see :func:`kmeans_fit_id`.
KMEANS_FIT = "kmeans_fit"


def kmeans_fit_id(samples: np.ndarray, n_clusters: int, seed: int) -> str:
    """``sha256:`` of what a k-means fit depends on: the sampled pixels (their bytes, shape
    and dtype), ``n_clusters``, ``seed`` and the scikit-learn and tileseg versions
    (:func:`pipeline.segment.classical.fit_kmeans` is deterministic given these)."""
    import hashlib
    from importlib.metadata import version

    from pipeline import __version__

    samples = np.ascontiguousarray(samples)
    digest = hashlib.sha256(samples.tobytes()).hexdigest()
    return config_hash({"samples": [digest, list(samples.shape), str(samples.dtype)], "n_clusters": n_clusters,
                        "seed": seed, "scikit-learn": version("scikit-learn"), "tileseg": __version__})  # fmt: skip


def earlier_kmeans_fit(store: Path, fit_id: str) -> KMeansModel | None:
    """The k-means model that the store's ``labels`` or ``labels_partial`` were made with,
    when its :data:`KMEANS_FIT` is ``fit_id``; else None. A rerun on the same sample so
    skips the fit (48 clusters on 2 x 10^5 pixels: about 10 s on 2 cores)."""
    for attrs in zstore.labels_attrs(store):
        if attrs.get(KMEANS_FIT) == fit_id and {"centroids", "kmeans_mean", "kmeans_std"} <= attrs.keys():
            return KMeansModel(np.asarray(attrs["centroids"], np.float64), np.asarray(attrs["kmeans_mean"], np.float64),
                               np.asarray(attrs["kmeans_std"], np.float64))  # fmt: skip
    return None


def write_labels(store: Path, cfg: SegmentConfig, labels: Any, probabilities: Any, grid: Grid, attrs: dict[str, Any],
                 where: str, progress: bool, overwrite: bool) -> None:  # fmt: skip
    """Write the lazy ``labels`` (y, x) (and ``probabilities`` (class, y, x)) into ``store``
    chunk by chunk and publish them, doing nothing for up-to-date labels and resuming a run
    with the same segment key (see the module docstring and :func:`pipeline.stages.segment`).

    Args:
        attrs: the labels' attributes (with the derived parameters); the key is added.
        where: the stage and store, for errors of chunk tasks.
        overwrite: recompute every chunk.

    Raises:
        RasterIOError: the store cannot be written; TilesegError: a chunk task failed.
    """
    key = segment_key(store, cfg, attrs, probabilities is not None, labels.chunks)
    attrs = {**attrs, zstore.SEGMENT_KEY: key}
    state = zstore.labels_state(store)
    with_probs = probabilities is not None
    if not overwrite and state[zstore.LABELS] == key and (state[zstore.PROBABILITIES] == key) == with_probs:
        log.info("labels in %s are up to date (same segment key %s…): nothing to do", store, key[7:19])
        return
    partial = zstore.LABELS + "_partial", zstore.PROBABILITIES + "_partial"
    resumable = not overwrite and state[partial[0]] == key and (not with_probs or state[partial[1]] == key)
    if not resumable:
        zstore.create_partial_labels(store, labels, grid, attrs, probabilities)
    done = zstore.done_chunks(store, key) if resumable else set()
    nby, nbx = labels.numblocks
    todo = [(i, j) for i in range(nby) for j in range(nbx) if (i, j) not in done]
    if resumable:
        log.info("resuming segment of %s: %d of %d chunks were already written; computing the other %d",
                 store, len(done), nby * nbx, len(todo))  # fmt: skip
    writer = zstore.ChunkWriter(str(store), key)
    # the U-Net's chunks strip after strip, the strips its window blocks were keyed by (pipeline.inference)
    strips = column_strips(labels.chunks[-1], cfg.unet.strip_px) if cfg.method == "unet" else None
    task = apply.chunk_tasks(apply.write_chunks(labels, probabilities, writer, where), todo, strips)
    if task is not None:
        compute(task, label=f"segment ({cfg.method}): {len(todo)} chunks", progress=progress,
                writes=f"labels in {store}")  # fmt: skip
    zstore.publish_labels(store)


# --------------------------------------------------------------------------- stitch and evaluate
def cog_state(path: Path, owner: str, labels_key: str | None, overwrite: bool) -> Literal["absent", "current", "stale"]:
    """Whether the COG at ``path`` is absent, up to date (same run and labels), or stale
    (same run, other labels; or ``overwrite``).

    Raises:
        OutputExistsError: the file belongs to another run (or is not tileseg's) and not ``overwrite``.
    """
    from pipeline.io.raster import raster_info

    path = Path(path)
    if not path.exists():
        return "absent"
    try:
        tags = raster_info(path).tags
    except RasterIOError:
        tags = {}
    if overwrite:
        return "stale"
    if tags.get(OWNER_TAG) != owner:
        who = f"run {tags[OWNER_TAG][:19]}…" if OWNER_TAG in tags else "something that is not this tileseg run"
        raise OutputExistsError(f"{path} was written by {who}; {_HOW}")
    return "current" if labels_key and tags.get(LABELS_TAG) == labels_key else "stale"


def check_report(out_dir: Path, key: str, overwrite: bool) -> None:
    """Refuse to replace a ``report.json`` (and the files beside it) of another run.

    Raises:
        OutputExistsError: ``out_dir/report.json`` has another ``config_hash`` and not ``overwrite``.
    """
    path = Path(out_dir) / "report.json"
    if overwrite or not path.exists():
        return
    try:
        found = files.read_json(path).get("config_hash")
    except Exception:  # unreadable or not a report: not ours either
        found = None
    if found != key:
        who = f"of run {found[:19]}…" if isinstance(found, str) else "not one of tileseg's"
        raise OutputExistsError(f"{path} is a report {who}, not of this run ({key[:19]}…); {_HOW}")


#: Root attribute of an OME-Zarr store (instance export) naming the run that wrote it.
RUN_ATTR = "tileseg_run"


def recorded_run(path: Path) -> str | None:
    """The run config hash an output records: a JSON report's ``config_hash``, a zarr
    store's root attribute :data:`RUN_ATTR`, a GeoTIFF's or TIFF's tag :data:`OWNER_TAG`;
    None when it records none (or cannot be read: not tileseg's either)."""
    import warnings

    from pipeline.io.raster import raster_info

    path = Path(path)
    try:
        if path.is_dir():
            found = zstore.read_root_attrs(path).get(RUN_ATTR)
        elif path.suffix == ".json":
            found = files.read_json(path).get("config_hash")
        else:
            with warnings.catch_warnings():  # a plain TIFF in pixel coordinates: NotGeoreferencedWarning
                warnings.simplefilter("ignore")
                found = raster_info(path).tags.get(OWNER_TAG)
    except Exception:  # unreadable, or not a mapping: not one of this run's outputs
        return None
    return found if isinstance(found, str) else None


def check_owned(paths: list[Path], key: str) -> None:
    """Refuse when one of ``paths`` exists and does not record the run ``key`` (:func:`recorded_run`).

    Raises:
        OutputExistsError: naming the first such output and the run it records.
    """
    for path in paths:
        if Path(path).exists():
            found = recorded_run(path)
            if found != key:
                who = f"run {found[:19]}…" if found else "something that is not this tileseg run"
                raise OutputExistsError(f"{path} was written by {who}, not by this run ({key[:19]}…); {_HOW}")


#: What an instance run writes in its output directory (:mod:`pipeline.instance_stages`).
INSTANCE_OUTPUTS = ("instances.ome.zarr", "instances.tif", "instances_cog.tif", "report_instances.json",
                    "panoptic.tif", "report_panoptic.json")  # fmt: skip


def check_run_outputs(config: RunConfig) -> None:
    """Before a whole run starts: refuse, unless ``config.overwrite``, when its store, COG,
    report or (with ``instances``) instance output (:data:`INSTANCE_OUTPUTS`) belongs to
    another run, so that a refused run changes nothing.

    Raises:
        OutputExistsError: naming the first such output.
    """
    if config.overwrite:
        return
    store = config.store_path
    source = zstore.read_root_attrs(store).get("source") if (store / "zarr.json").is_file() else None
    if source is not None:  # a microscopy store (pipeline.stages.ingest_microscopy): rewritten by every run
        inputs = [Path(p).resolve() for p in config.inputs]
        if inputs != [Path(source).resolve()]:
            raise refuse_store(store, f"it holds {source}, not {', '.join(map(str, config.inputs))}")
    else:
        verdict, why = store_verdict(store, list(config.inputs), config.ingest)
        if verdict == "other":
            raise refuse_store(store, why)
    key = config.config_hash()
    if config.instances is None or config.segment.method != "none":
        cog_state(config.cog_path, key, None, False)
        check_report(config.output_dir, key, False)
    if config.instances is not None:
        check_owned([config.output_dir / name for name in INSTANCE_OUTPUTS], key)
