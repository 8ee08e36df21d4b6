"""IoU reports: JSON (machine-readable) and Markdown (for people), from one confusion matrix."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.metrics import SemanticMetrics


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def report_dict(m: SemanticMetrics, class_names: list[str], inputs: dict[str, str]) -> dict[str, Any]:
    """The report as a JSON-ready dict. IoU of a class absent from both sides is null."""
    classes = []
    for i, name in enumerate(class_names):
        classes.append(
            {
                "id": i,
                "name": name,
                "iou": _num(m.iou[i]),
                "ground_truth_pixels": int(m.support[i]),
                "predicted_pixels": int(m.predicted[i]),
            }
        )
    return {
        "tileseg_version": __version__,
        "inputs": inputs,
        "classes": classes,
        "miou_macro": _num(m.miou),
        "miou_definition": "mean of per-class IoU over classes present in ground truth or prediction",
        "classes_not_applicable": [c["name"] for c in classes if c["iou"] is None],
        "overall_accuracy": _num(m.overall_accuracy),
        "evaluated_pixels": m.evaluated_pixels,
        "excluded_pixels": {**m.excluded, "total": int(sum(m.excluded.values()))},
        "confusion_matrix": {
            "rows": "ground truth",
            "columns": "prediction",
            "labels": class_names,
            "counts": m.confusion.tolist(),
        },
    }


def iou_table(m: SemanticMetrics, class_names: list[str]) -> list[dict[str, Any]]:
    """Rows {class, IoU, GT pixels, predicted pixels} for text tables and Prefect table artifacts."""
    rows = []
    for i, name in enumerate(class_names):
        iou = m.iou[i]
        rows.append(
            {
                "class": name,
                "IoU": "n/a" if math.isnan(iou) else f"{iou:.4f}",
                "ground truth px": int(m.support[i]),
                "predicted px": int(m.predicted[i]),
            }
        )
    return rows


def markdown(m: SemanticMetrics, class_names: list[str], inputs: dict[str, str]) -> str:
    """The report as Markdown: per-class table, mIoU, accuracy, exclusions, confusion matrix."""
    lines = ["# tileseg evaluation report", ""]
    lines += [f"- {k}: `{v}`" for k, v in inputs.items()]
    lines += ["", "| class | IoU | ground-truth px | predicted px |", "|---|---:|---:|---:|"]
    for row in iou_table(m, class_names):
        lines.append(f"| {row['class']} | {row['IoU']} | {row['ground truth px']} | {row['predicted px']} |")
    lines += [
        "",
        f"**mIoU (macro, over classes present in ground truth or prediction): {m.miou:.4f}**",
        "",
        f"Overall pixel accuracy: {m.overall_accuracy:.4f} over {m.evaluated_pixels} pixels.",
        "",
        "Excluded pixels: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in m.excluded.items())
        + f" (total {sum(m.excluded.values())}).",
        "",
        "## Confusion matrix (rows: ground truth, columns: prediction)",
        "",
        "| | " + " | ".join(class_names) + " |",
        "|---|" + "---:|" * len(class_names),
    ]
    for i, name in enumerate(class_names):
        lines.append(f"| **{name}** | " + " | ".join(str(int(v)) for v in m.confusion[i]) + " |")
    return "\n".join(lines) + "\n"


def console_table(m: SemanticMetrics, class_names: list[str]) -> str:
    """Plain-text per-class IoU table with mIoU, for the terminal."""
    width = max([len(n) for n in class_names] + [5])
    out = [f"{'class':<{width}}  {'IoU':>7}  {'GT px':>10}  {'pred px':>10}"]
    for row in iou_table(m, class_names):
        out.append(
            f"{row['class']:<{width}}  {row['IoU']:>7}  {row['ground truth px']:>10}  {row['predicted px']:>10}"
        )
    out.append(f"{'mIoU':<{width}}  {m.miou:>7.4f}")
    out.append(f"{'accuracy':<{width}}  {m.overall_accuracy:>7.4f}")
    return "\n".join(out)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(
    m: SemanticMetrics, class_names: list[str], inputs: dict[str, str], out_dir: Path
) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (each atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / "report.json", out_dir / "report.md"
    _atomic_write(jpath, json.dumps(report_dict(m, class_names, inputs), indent=2) + "\n")
    _atomic_write(mpath, markdown(m, class_names, inputs))
    return jpath, mpath
