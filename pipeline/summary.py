"""Run summary: what a run read, wrote and counted, and how long each stage took.

:func:`label_counts` reads the finished store's ``labels`` once (one Dask pass of
per-chunk ``bincount``s, summed: counts, never ratios, are added across chunks) and
:func:`summary_markdown` renders a :class:`RunSummary` as Markdown, for the Prefect
run-summary artifact of ``landcover_run`` or anywhere else. Nothing here imports Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from pipeline.cluster import compute
from pipeline.config import LABEL_NODATA
from pipeline.errors import InputError
from pipeline.io import store as zstore


@dataclass(frozen=True)
class LabelCounts:
    """Pixel counts of a label raster.

    Attributes:
        shape: (y, x) size of the raster in pixels.
        band_names: the store's image bands (empty when the store holds labels only).
        per_value: pixels per label value, int64 array of length 256 (uint8 labels);
            ``per_value[LABEL_NODATA]`` counts nodata pixels.
    """

    shape: tuple[int, int]
    band_names: list[str]
    per_value: np.ndarray

    @property
    def total(self) -> int:
        """All pixels, y * x."""
        return self.shape[0] * self.shape[1]

    @property
    def nodata(self) -> int:
        """Pixels labelled ``LABEL_NODATA`` (255): some band used was nodata."""
        return int(self.per_value[LABEL_NODATA])

    @property
    def labelled(self) -> int:
        """Pixels with a class (every value but ``LABEL_NODATA``)."""
        return self.total - self.nodata

    def per_class(self) -> dict[int, int]:
        """Class id -> pixels, for the ids that occur (nodata left out)."""
        return {int(v): int(n) for v, n in enumerate(self.per_value) if n and v != LABEL_NODATA}


def label_counts(store: Path | str, progress: bool = False) -> LabelCounts:
    """Count the pixels of each label value in a store's ``labels`` (y, x) uint8.

    Computed on the current Dask client (or Dask's local scheduler), chunk by chunk.

    Raises:
        RasterIOError: the store cannot be opened.
        InputError: the store has no ``labels`` (run the segment stage first).
    """
    ds = zstore.open_store(store)
    if zstore.LABELS not in ds:
        raise InputError(f"{store} has no labels; run `tileseg segment {store}` first")
    labels = ds[zstore.LABELS].data
    if labels.dtype != np.uint8:
        raise InputError(f"labels of {store} are {labels.dtype}, expected uint8")
    (counts,) = compute(da.bincount(labels.ravel(), minlength=256), label="run summary: label counts",
                        progress=progress)  # fmt: skip
    bands = list(ds[zstore.IMAGE].attrs.get("band_names", [])) if zstore.IMAGE in ds else []
    return LabelCounts((int(labels.shape[0]), int(labels.shape[1])), bands, np.asarray(counts, dtype=np.int64))


@dataclass
class RunSummary:
    """Everything the run-summary artifact shows.

    Attributes:
        name: run name (``RunConfig.name``).
        config_hash: ``sha256:...`` of the run config (:func:`pipeline.config.config_hash`).
        inputs: input raster paths as configured.
        outputs: output name -> path (store, cog, report_json, ...).
        class_names: class names; a class id is its position.
        counts: label pixel counts, or None when they were not computed.
        durations_s: stage -> wall time in seconds as seen by the flow (including retries).
        report: the evaluation report (as in report.json), or None without ground truth.
    """

    name: str
    config_hash: str
    inputs: list[str]
    outputs: dict[str, str]
    class_names: list[str] = field(default_factory=list)
    counts: LabelCounts | None = None
    durations_s: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] | None = None


def _table(header: list[str], rows: list[list[Any]], right: set[int] = frozenset()) -> list[str]:
    rule = "|".join("---:" if i in right else "---" for i in range(len(header)))
    out = ["| " + " | ".join(header) + " |", f"|{rule}|"]
    return out + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.2f} %" if total else "n/a"


def summary_markdown(s: RunSummary) -> str:
    """The summary as Markdown: inputs, outputs, pixel counts, stage durations, and the
    per-class IoU table with macro mIoU when the run was evaluated."""
    lines = [f"# Run summary: {s.name}", "", f"Config hash `{s.config_hash}`.", "", "## Inputs", ""]
    lines += _table(["#", "path"], [[i, f"`{p}`"] for i, p in enumerate(s.inputs, 1)])
    lines += ["", "## Outputs", ""] + _table(["output", "path"], [[k, f"`{v}`"] for k, v in s.outputs.items()])
    c = s.counts
    if c is not None:
        bands = f", {len(c.band_names)} bands ({', '.join(c.band_names)})." if c.band_names else "."
        lines += ["", "## Pixels", "", f"Raster {c.shape[0]:,} x {c.shape[1]:,} px (y, x){bands}", ""]
        lines += _table(["pixels", "count", "share"], [
            ["all", f"{c.total:,}", _pct(c.total, c.total)],
            ["labelled (valid)", f"{c.labelled:,}", _pct(c.labelled, c.total)],
            [f"nodata ({LABEL_NODATA})", f"{c.nodata:,}", _pct(c.nodata, c.total)],
        ], {1, 2})  # fmt: skip
        rows = [[cid, s.class_names[cid] if cid < len(s.class_names) else f"class {cid}", f"{n:,}", _pct(n, c.labelled)]
                for cid, n in sorted(c.per_class().items())]  # fmt: skip
        lines += ["", "### Labelled pixels per class", ""]
        lines += _table(["id", "class", "pixels", "share of labelled"], rows, {0, 2, 3})
    if s.durations_s:
        total = sum(s.durations_s.values())
        rows = [[k, f"{v:.1f}"] for k, v in s.durations_s.items()] + [["total", f"{total:.1f}"]]
        lines += ["", "## Stage durations", ""] + _table(["stage", "seconds"], rows, {1})
    if s.report is not None:
        from pipeline.report import iou_table

        doc = s.report
        miou = doc["aggregates"]["macro_miou"]
        lines += ["", "## IoU against ground truth", "",
                  f"Macro mIoU {'n/a' if miou is None else f'{miou:.4f}'} over {doc['evaluated_pixels']:,} evaluated "
                  "pixels (* = not applicable, left out of the macro mean).", ""]  # fmt: skip
        keys = ["class", "IoU", "Dice/F1", "precision", "recall", "ground truth px", "predicted px"]
        lines += _table(keys, [[r[k] for k in keys] for r in iou_table(doc)], set(range(1, len(keys))))
    return "\n".join(lines) + "\n"
