"""Evaluation reports: the report dict (``report.json``), Markdown, console tables, and
``tileseg compare``. The HTML page is :mod:`pipeline.report_html`.

Every number comes from one :class:`~pipeline.metrics.SemanticMetrics` (one confusion
matrix). Undefined values (0/0, such as the IoU of a class absent from both sides) are
``null`` in JSON and ``n/a`` in text, never 0.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import InputError
from pipeline.grid import Grid, pixel_area
from pipeline.metrics import AGGREGATES, EXCLUSION_EXPLANATIONS, SemanticMetrics

SCHEMA_VERSION = 2

NOT_APPLICABLE_REASONS = {
    "absent": "absent from ground truth and prediction",
    "ignored": "listed in ignore_classes",
}


def _num(x: Any, digits: int = 6) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), digits)


def area_unit(crs_wkt: str | None) -> tuple[float, str, str]:
    """How to express areas for a CRS: (factor from squared map units, unit, note).

    Projected CRS in metres: hectares (1 ha = 10,000 m²). Projected in other linear
    units: squared CRS units (``US survey foot²``). Geographic: squared degrees, with a
    warning that they are not areas. No CRS: squared map units (pixels for microscopy
    unless the transform says otherwise).
    """
    if not crs_wkt:
        return 1.0, "map units²", "no CRS: areas in squared map units of the transform"
    from rasterio.crs import CRS

    crs = CRS.from_wkt(crs_wkt)
    if crs.is_projected:
        unit, factor = crs.linear_units_factor
        if abs(factor - 1.0) < 1e-12 and unit.lower() in ("metre", "meter", "m"):
            return 1e-4, "ha", "projected CRS in metres: hectares (1 ha = 10,000 m²)"
        return 1.0, f"{unit}²", f"projected CRS in {unit}: areas in squared CRS units"
    return 1.0, "deg²", "geographic CRS: areas in squared degrees, which are not comparable across latitudes"


def _crs_name(crs_wkt: str | None) -> str | None:
    if not crs_wkt:
        return None
    from rasterio.crs import CRS

    crs = CRS.from_wkt(crs_wkt)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def report_dict(
    m: SemanticMetrics,
    class_names: list[str],
    inputs: dict[str, Any],
    grid: Grid | None = None,
    context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict (the content of ``report.json``).

    Args:
        inputs: name -> {"path", "sha256", "of"} (:func:`pipeline.io.files.checksum`).
        grid: the prediction grid (for areas and georeferencing).
        context: extra top-level entries (config hash, area, image validity, options, ...).
    """
    if grid is None:  # bare metrics (scripts, training): no grid, so areas are pixel counts
        factor, unit, unit_note = 1.0, "px", "no grid given: areas in pixels"
    else:
        factor, unit, unit_note = area_unit(grid.crs_wkt)
    px_area = pixel_area(grid) if grid else 1.0

    def area(pixels: int) -> float:
        return round(pixels * px_area * factor, 4)

    classes = []
    for i, name in enumerate(class_names):
        reason = m.not_applicable.get(i)
        support, predicted = int(m.support[i]), int(m.predicted[i])
        classes.append(
            {
                "id": i,
                "name": name,
                "applicable": reason is None,
                "not_applicable_reason": NOT_APPLICABLE_REASONS[reason] if reason else None,
                "iou": _num(m.iou[i]),
                "dice_f1": _num(m.dice[i]),
                "precision": _num(m.precision[i]),
                "recall": _num(m.recall[i]),
                "support_pixels": support,
                "predicted_pixels": predicted,
                "support_area": area(support),
                "predicted_area": area(predicted),
            }
        )
    excluded = {**m.excluded, "total": m.excluded_pixels}
    doc: dict[str, Any] = {
        "report": "tileseg evaluation report",
        "schema_version": SCHEMA_VERSION,
        "tileseg_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "grid": {
            "crs": _crs_name(grid.crs_wkt) if grid else None,
            "width": grid.width if grid else None,
            "height": grid.height if grid else None,
            "transform": list(grid.transform)[:6] if grid else None,
            "pixel_area": px_area,
        },
        "area_unit": unit,
        "area_unit_note": unit_note,
        "classes": classes,
        "aggregates": {key: _num(v) for key, v in m.aggregates().items()},
        "aggregate_definitions": {key: {"name": name, "definition": d} for key, (_, name, d) in AGGREGATES.items()},
        "classes_not_applicable": [
            {"name": c["name"], "reason": c["not_applicable_reason"]} for c in classes if not c["applicable"]
        ],
        "evaluated_pixels": m.evaluated_pixels,
        "evaluated_area": area(m.evaluated_pixels),
        "excluded_pixels": excluded,
        "exclusion_rules": {
            "order": "each excluded pixel is counted once, under the first reason that applies, in this order",
            "reasons": {r: EXCLUSION_EXPLANATIONS[r] for r in m.excluded},
        },
        "confusion_matrix": {
            "rows": "ground truth",
            "columns": "prediction",
            "labels": class_names,
            "counts": m.confusion.tolist(),
        },
    }
    doc.update(context or {})
    return doc


# --------------------------------------------------------------------------- text forms
Report = dict[str, Any] | SemanticMetrics


def as_report(report: Report, class_names: list[str] | None = None, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A report dict, or one built from bare metrics and class names (no grid: areas in
    pixels). The text forms below accept either, so callers holding only a
    :class:`SemanticMetrics` (scripts, training) can print it too."""
    if isinstance(report, SemanticMetrics):
        if class_names is None:
            raise TypeError("class_names are needed with bare metrics")
        return report_dict(report, list(class_names), {k: {"path": str(v)} for k, v in (inputs or {}).items()})
    return report

def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _fmt_area(v: float) -> str:
    return f"{v:,.2f}" if v < 1e6 else f"{v:,.0f}"


def iou_table(report: Report, class_names: list[str] | None = None) -> list[dict[str, Any]]:
    """Per-class rows (text values) for Markdown and Prefect table artifacts."""
    doc = as_report(report, class_names)
    unit = doc["area_unit"]
    rows = []
    for c in doc["classes"]:
        rows.append(
            {
                "class": c["name"] + ("" if c["applicable"] else " *"),
                "IoU": _fmt(c["iou"]),
                "Dice/F1": _fmt(c["dice_f1"]),
                "precision": _fmt(c["precision"]),
                "recall": _fmt(c["recall"]),
                "ground truth px": c["support_pixels"],
                f"ground truth {unit}": _fmt_area(c["support_area"]),
                "predicted px": c["predicted_pixels"],
                f"predicted {unit}": _fmt_area(c["predicted_area"]),
            }
        )
    return rows


def aggregate_table(doc: dict[str, Any]) -> list[dict[str, str]]:
    """Rows {metric, value, definition} of the six aggregates."""
    defs = doc["aggregate_definitions"]
    return [
        {"metric": defs[k]["name"], "value": _fmt(v), "definition": defs[k]["definition"]}
        for k, v in doc["aggregates"].items()
    ]


def exclusion_table(doc: dict[str, Any]) -> list[dict[str, str]]:
    """Rows {pixels, count, share, meaning}: evaluated pixels, then each exclusion reason."""
    ex = doc["excluded_pixels"]
    total = doc["evaluated_pixels"] + ex["total"]
    share = (lambda n: f"{100 * n / total:.1f} %") if total else (lambda n: "n/a")
    rows = [{"pixels": "evaluated", "count": f"{doc['evaluated_pixels']:,}", "share": share(doc["evaluated_pixels"]),
             "meaning": "inside the area, with valid image, ground truth and prediction"}]  # fmt: skip
    for reason, meaning in doc["exclusion_rules"]["reasons"].items():
        if reason == "nodata_image" and str(doc.get("image_validity", "")).startswith("not available"):
            meaning = "not checked: no image was available (see image validity)"
        rows.append({"pixels": reason.replace("_", " "), "count": f"{ex[reason]:,}", "share": share(ex[reason]),
                     "meaning": meaning})  # fmt: skip
    rows.append({"pixels": "excluded, total", "count": f"{ex['total']:,}", "share": share(ex["total"]), "meaning": ""})
    return rows


def _md_table(rows: list[dict[str, Any]], right: set[str] = frozenset()) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "|".join("---:" if k in right else "---" for k in keys) + "|"]
    out += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return out


def not_applicable_sentence(doc: dict[str, Any]) -> str:
    """'Left out of the macro means: wetland (absent from ...).' or that none was."""
    left = doc["classes_not_applicable"]
    if not left:
        return "Every class is applicable: none was left out of the macro means."
    return "Left out of the macro means (not applicable, marked *): " + "; ".join(
        f"{c['name']} ({c['reason']})" for c in left
    ) + "."


def markdown(report: Report, class_names: list[str] | None = None, inputs: dict[str, Any] | None = None) -> str:
    """The report as Markdown: summary, per-class table, exclusions, confusion matrix, inputs."""
    doc = as_report(report, class_names, inputs)
    names = doc["confusion_matrix"]["labels"]
    inputs = doc.get("inputs", {})
    lines = ["# tileseg evaluation report", ""]
    pred, gt = inputs.get("prediction", {}).get("path"), inputs.get("ground_truth", {}).get("path")
    if pred and gt:
        lines += [f"Prediction `{pred}` against ground truth `{gt}`.", ""]
    lines += [f"- evaluation area: {doc.get('area', 'whole raster')}"]
    if "image_validity" in doc:
        lines += [f"- image validity: {doc['image_validity']}"]
    lines += [f"- areas: {doc['area_unit']} ({doc['area_unit_note']})", ""]
    lines += ["## Summary", ""] + _md_table(aggregate_table(doc), {"value"})
    lines += ["", "## Per class", ""]
    lines += _md_table(iou_table(doc), set(list(iou_table(doc)[0])[1:]) if doc["classes"] else set())
    lines += ["", not_applicable_sentence(doc), ""]
    lines += ["## Evaluated and excluded pixels", ""]
    lines += [doc["exclusion_rules"]["order"].capitalize() + ".", ""]
    lines += _md_table(exclusion_table(doc), {"count", "share"})
    lines += ["", "## Confusion matrix (rows: ground truth, columns: prediction)", ""]
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for i, name in enumerate(names):
        lines.append(f"| **{name}** | " + " | ".join(str(int(v)) for v in doc["confusion_matrix"]["counts"][i]) + " |")
    if inputs:
        lines += ["", "## Inputs", "", "| input | path | SHA-256 | of |", "|---|---|---|---|"]
        for k, v in inputs.items():
            lines.append(f"| {k} | `{v.get('path')}` | `{v.get('sha256') or 'n/a'}` | {v.get('of', 'not computed')} |")
    lines += ["", f"tileseg {doc['tileseg_version']}; config hash `{doc.get('config_hash', 'n/a')}` "
              f"(of the {doc.get('config_hash_of', 'settings')}); created {doc['created']}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def console_table(report: Report, class_names: list[str] | None = None) -> str:
    """Plain-text per-class table and aggregates, for the terminal."""
    doc = as_report(report, class_names)
    width = max([len(c["name"]) for c in doc["classes"]] + [22])
    unit = doc["area_unit"]
    with_area = unit != "px"  # an area column in pixels would repeat the pixel counts
    out = [f"{'class':<{width}}  {'IoU':>7}  {'Dice/F1':>7}  {'prec.':>7}  {'recall':>7}  {'GT px':>10}  "
           f"{'pred px':>10}" + (f"  {'GT ' + unit:>10}" if with_area else "")]  # fmt: skip
    for c in doc["classes"]:
        name = c["name"] + ("" if c["applicable"] else " *")
        out.append(
            f"{name:<{width}}  {_fmt(c['iou']):>7}  {_fmt(c['dice_f1']):>7}  {_fmt(c['precision']):>7}  "
            f"{_fmt(c['recall']):>7}  {c['support_pixels']:>10}  {c['predicted_pixels']:>10}"
            + (f"  {_fmt_area(c['support_area']):>10}" if with_area else "")
        )
    out.append("")
    defs = doc["aggregate_definitions"]
    for k, v in doc["aggregates"].items():
        out.append(f"{defs[k]['name']:<{width}}  {_fmt(v):>7}")
    out.append("")
    out.append(not_applicable_sentence(doc))
    ex = doc["excluded_pixels"]
    why = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in ex.items() if k != "total" and v)
    out.append(f"evaluated {doc['evaluated_pixels']:,} px; excluded {ex['total']:,} px" + (f" ({why})" if why else ""))
    return "\n".join(out)


# --------------------------------------------------------------------------- compare
def load_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json``.

    Raises:
        RasterIOError: missing file. InputError: not a tileseg report.
    """
    from pipeline.io.files import read_json

    doc = read_json(path)
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind in ("instances", "panoptic"):
        what = "an object-level (instances)" if kind == "instances" else "a panoptic"
        raise InputError(f"{path} is {what} report; `tileseg compare` compares semantic report.json files "
                         "(from `tileseg evaluate` or a land-cover run)")  # fmt: skip
    if not isinstance(doc, dict) or "classes" not in doc or "aggregates" not in doc:
        raise InputError(f"{path} is not a tileseg report.json (schema {SCHEMA_VERSION}); re-run tileseg evaluate")
    return doc


def _delta(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{b - a:+.4f}"


def compare(a: dict[str, Any], b: dict[str, Any], label_a: str = "A", label_b: str = "B") -> str:
    """Per-class IoU (and Dice/F1) differences and aggregate differences, B minus A.

    Raises:
        InputError: the two reports have different class lists.
    """
    names_a = [c["name"] for c in a["classes"]]
    names_b = [c["name"] for c in b["classes"]]
    if names_a != names_b:
        raise InputError(f"the reports have different class lists: {label_a} {names_a}, {label_b} {names_b}")
    width = max([len(n) for n in names_a] + [22])
    out = [f"{'class':<{width}}  {'IoU A':>7}  {'IoU B':>7}  {'ΔIoU':>8}  {'ΔDice/F1':>9}"]
    for ca, cb in zip(a["classes"], b["classes"]):
        out.append(
            f"{ca['name']:<{width}}  {_fmt(ca['iou']):>7}  {_fmt(cb['iou']):>7}  {_delta(ca['iou'], cb['iou']):>8}  "
            f"{_delta(ca['dice_f1'], cb['dice_f1']):>9}"
        )
    out.append("")
    defs = a["aggregate_definitions"]
    for k in a["aggregates"]:
        va, vb = a["aggregates"][k], b["aggregates"].get(k)
        out.append(f"{defs[k]['name']:<{width}}  {_fmt(va):>7}  {_fmt(vb):>7}  {_delta(va, vb):>8}")
    notes = []
    sha = lambda d, k: d.get("inputs", {}).get(k, {}).get("sha256")  # noqa: E731
    if sha(a, "ground_truth") != sha(b, "ground_truth"):
        notes.append("the ground truth differs (checksum)")
    if a.get("area") != b.get("area"):
        notes.append(f"the evaluation areas differ ({a.get('area')} vs {b.get('area')})")
    if a["evaluated_pixels"] != b["evaluated_pixels"]:
        notes.append(f"evaluated pixels differ ({a['evaluated_pixels']:,} vs {b['evaluated_pixels']:,})")
    na_a = {c["name"] for c in a["classes_not_applicable"]}
    na_b = {c["name"] for c in b["classes_not_applicable"]}
    if na_a != na_b:
        notes.append(f"not-applicable classes differ ({sorted(na_a)} vs {sorted(na_b)}), so macro means average "
                     "different classes")  # fmt: skip
    out.append("")
    out.append("Δ = B - A. " + ("Note: " + "; ".join(notes) + "." if notes else "Same ground truth, area and pixels."))
    return "\n".join(out)
