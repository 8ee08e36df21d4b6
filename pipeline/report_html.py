"""``report.html``: one self-contained page (inline CSS, images as base64 PNG, no external
URL) with the tables of the report, the confusion-matrix heat maps (row-normalised and
counts), a per-class IoU bar chart, and a quicklook of image | prediction | ground truth |
error map over the evaluation area in the class colours of the label COG.

Plots use matplotlib's object API (``Figure``, Agg), never ``pyplot``'s global state,
so rendering is safe in worker threads and leaves no open figures.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.windows import Window

from pipeline.metrics import ERROR_CORRECT, ERROR_EXCLUDED, ERROR_WRONG, SemanticMetrics
from pipeline.report import aggregate_table, exclusion_table, iou_table, not_applicable_sentence

RGBA = tuple[int, int, int, int]
#: Colours of the error map (its COG colour table and the quicklook): excluded grey, correct green, wrong red.
ERROR_RGBA = {ERROR_EXCLUDED: (190, 190, 190, 255), ERROR_CORRECT: (26, 152, 80, 255), ERROR_WRONG: (215, 48, 39, 255)}
_UNLABELED = (255, 255, 255, 0)


@dataclass
class Quicklook:
    """Decimated arrays of the evaluation area's window (every ``step``-th pixel).

    Attributes:
        pred, gt, errors: (h, w) class ids / error codes.
        rgb: (3 or fewer, h, w) image bands, or None when no image is available.
        valid: (h, w) bool image validity, or None.
        step: decimation step in pixels; window: the full-resolution window (pixels).
    """

    pred: np.ndarray
    gt: np.ndarray
    errors: np.ndarray
    rgb: np.ndarray | None
    valid: np.ndarray | None
    step: int
    window: Window

    @classmethod
    def from_arrays(cls, looks: list[np.ndarray], step: int, window: Window) -> Quicklook:
        """From [pred, gt, errors] or [pred, gt, errors, rgb, valid], as computed by the evaluate stage."""
        pred, gt, err, *rest = (np.asarray(a) for a in looks)
        rgb, valid = (rest[0], rest[1]) if rest else (None, None)
        return cls(pred, gt, err, rgb, valid, step, window)


# --------------------------------------------------------------------------- figures
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def heatmaps_png(m: SemanticMetrics, names: list[str]) -> str:
    """Two heat maps side by side: row-normalised (% of each ground-truth class) and counts."""
    from matplotlib.colors import LogNorm

    cm = m.confusion.astype(np.float64)
    k = len(names)
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = np.where(support > 0, 100 * cm / np.where(support > 0, support, 1), np.nan)
    side = max(4.0, 0.55 * k + 2.2)
    fig = _figure(2 * side + 1.2, side)
    axes = fig.subplots(1, 2)
    annotate = k <= 20
    panels = [
        (rows, "row-normalised: % of each ground-truth class", dict(vmin=0, vmax=100), "{:.0f}"),
        (np.where(cm > 0, cm, np.nan), "counts (pixels, log colour scale)",
         dict(norm=LogNorm(vmin=1, vmax=max(cm.max(), 2))), "{:.0f}"),
    ]  # fmt: skip
    for ax, (data, title, scale, fmt) in zip(axes, panels):
        cmap = _cmap("Blues")
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, **scale)
        ax.set_title(title, fontsize=11)
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=9)
        ax.set_yticks(range(k), names, fontsize=9)
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth")
        fig.colorbar(im, ax=ax, shrink=0.8, label="%" if data is rows else "pixels")
        if annotate:
            top = np.nanmax(data) if np.isfinite(data).any() else 1
            for i in range(k):
                for j in range(k):
                    v = data[i, j]
                    if data is rows and np.isnan(v):
                        ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="#888")
                    elif not np.isnan(v):
                        dark = (v / 100 if data is rows else np.log(max(v, 1)) / np.log(max(top, 2))) > 0.6
                        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8 if k <= 12 else 6,
                                color="white" if dark else "#222")  # fmt: skip
    return _png(fig)


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#f2f2f2")


def iou_bars_png(m: SemanticMetrics, names: list[str], colours: dict[int, RGBA]) -> str:
    """Horizontal bar per class (IoU, class colour); n/a classes labelled; macro mIoU as a line."""
    k = len(names)
    fig = _figure(8.5, max(2.5, 0.42 * k + 1.2))
    ax = fig.subplots()
    ys = np.arange(k)
    vals = np.nan_to_num(m.iou, nan=0.0)
    cols = [tuple(c / 255 for c in colours.get(i, (120, 120, 120, 255))[:3]) for i in range(k)]
    ax.barh(ys, vals, color=cols, edgecolor="#333", linewidth=0.6)
    for i in range(k):
        reason = m.not_applicable.get(i)
        if np.isnan(m.iou[i]) or reason:
            label = f"{m.iou[i]:.3f} (not applicable: {reason})" if not np.isnan(m.iou[i]) else f"n/a ({reason})"
        else:
            label = f"{m.iou[i]:.3f}"
        ax.text(vals[i] + 0.01, i, label, va="center", fontsize=9)
    if not np.isnan(m.miou):
        ax.axvline(m.miou, color="#444", linestyle="--", linewidth=1)
        ax.text(m.miou, -0.75, f" macro mIoU {m.miou:.3f}", fontsize=9, color="#444", va="bottom")
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.18)
    ax.set_ylim(k - 0.5, -1.0)
    ax.set_xlabel("IoU (Jaccard)")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _classes_rgba(arr: np.ndarray, colours: dict[int, RGBA], k: int) -> np.ndarray:
    out = np.zeros(arr.shape + (4,), dtype=np.uint8)
    out[...] = _UNLABELED
    for c in range(k):
        out[arr == c] = colours.get(c, (120, 120, 120, 255))
    return out


def _stretch(rgb: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """(bands, h, w) -> (h, w, 3) float in [0, 1]: 2-98 % percentile stretch per band over valid pixels."""
    bands = rgb.astype(np.float64)
    if bands.shape[0] < 3:  # one or two bands: grey from the first
        bands = np.repeat(bands[:1], 3, axis=0)
    ok = np.isfinite(bands).all(axis=0) & (valid if valid is not None else True)
    out = np.ones(bands.shape[1:] + (3,))
    for b in range(3):
        v = bands[b][ok]
        if v.size:
            lo, hi = np.percentile(v, [2, 98])
            out[..., b] = np.clip((bands[b] - lo) / (hi - lo if hi > lo else 1), 0, 1)
    out[~ok] = 1.0
    return out


def quicklook_png(q: Quicklook, names: list[str], colours: dict[int, RGBA], extent: tuple[float, float, float, float],
                  err_nodata: int) -> str:  # fmt: skip
    """image | prediction | ground truth | error map, side by side, with legends."""
    from matplotlib.patches import Patch

    k = len(names)
    h, w = q.pred.shape
    aspect = h / max(w, 1)
    panel_w = 4.2
    fig = _figure(4 * panel_w, panel_w * aspect + 0.8)
    axes = fig.subplots(1, 4)
    xmin, ymin, xmax, ymax = extent
    ext = (xmin, xmax, ymin, ymax)
    if q.rgb is not None:
        axes[0].imshow(_stretch(q.rgb, q.valid), extent=ext, interpolation="nearest")
    else:
        axes[0].text(0.5, 0.5, "image not available", ha="center", va="center", transform=axes[0].transAxes)
    axes[1].imshow(_classes_rgba(q.pred, colours, k), extent=ext, interpolation="nearest")
    axes[2].imshow(_classes_rgba(q.gt, colours, k), extent=ext, interpolation="nearest")
    err = np.zeros(q.errors.shape + (4,), dtype=np.uint8)
    for code, rgba in ERROR_RGBA.items():
        err[q.errors == code] = rgba
    err[q.errors == err_nodata] = _UNLABELED
    axes[3].imshow(err, extent=ext, interpolation="nearest")
    for ax, title in zip(axes, ["image", "prediction", "ground truth", "error map"]):
        ax.set_title(title, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_facecolor("white")
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(ymin, ymax)
    handles = [Patch(facecolor=np.array(colours.get(c, (120, 120, 120, 255))) / 255, edgecolor="#333", label=n)
               for c, n in enumerate(names)]  # fmt: skip
    handles.append(Patch(facecolor="white", edgecolor="#333", label="unlabeled / no data"))
    fig.legend(handles=handles, loc="outside lower left", ncol=min(len(handles), 9), fontsize=9, frameon=False)
    err_handles = [Patch(facecolor=np.array(ERROR_RGBA[c]) / 255, edgecolor="#333", label=lab)
                   for c, lab in ((ERROR_CORRECT, "correct"), (ERROR_WRONG, "wrong"), (ERROR_EXCLUDED, "excluded"))]  # fmt: skip
    fig.legend(handles=err_handles, loc="outside lower right", ncol=3, fontsize=9, frameon=False)
    return _png(fig)


# --------------------------------------------------------------------------- page
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2433;background:#f6f7f9}
main{max-width:1280px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:32px 0 10px;border-bottom:1px solid #d7dbe2;padding-bottom:4px}
.sub{color:#5b6475;margin:0 0 18px;font-size:.95em}
.cards{display:grid;grid-template-columns:repeat(6,1fr);gap:10px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 12px}
.card .v{font-size:1.6em;font-weight:600}.card .n{font-size:.85em;color:#5b6475}
table{border-collapse:collapse;background:#fff;font-size:.9em;margin:6px 0}
th,td{border:1px solid #dde1e8;padding:4px 8px}th{background:#eef1f5;text-align:left}
td.r{text-align:right;font-variant-numeric:tabular-nums}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #333;margin-right:6px;vertical-align:-1px}
.na{color:#8a93a3}.note{background:#fff8e1;border:1px solid #f0d98c;border-radius:6px;padding:8px 12px;font-size:.92em}
figure{margin:8px 0;background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:8px}
figure img{max-width:100%;height:auto;display:block}figcaption{font-size:.85em;color:#5b6475;margin-top:4px}
code{font-size:.88em;word-break:break-all}.small{font-size:.85em;color:#5b6475}
"""


def _table(rows: list[dict[str, Any]], right: set[str] = frozenset(), first_cell=None) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for j, k in enumerate(keys):
            text = html.escape(str(r[k]))
            if j == 0 and first_cell:
                text = first_cell(i, text)
            cls = ' class="r"' if k in right else ""
            if str(r[k]) == "n/a":
                cls = ' class="r na"'
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _fig(img_id: str, b64: str, alt: str, caption: str) -> str:
    return (f'<figure id="{img_id}"><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip


def render(doc: dict[str, Any], m: SemanticMetrics, names: list[str], colours: dict[int, RGBA],
           quick: Quicklook | None, extent: tuple[float, float, float, float] | None = None) -> str:  # fmt: skip
    """The whole page as one HTML string (UTF-8, no external resource)."""
    e = html.escape
    inputs = doc.get("inputs", {})
    pred = inputs.get("prediction", {}).get("path", "?")
    gt = inputs.get("ground_truth", {}).get("path", "?")
    cards = "".join(
        f'<div class="card"><div class="v">{e(r["value"])}</div><div class="n">{e(r["metric"])}</div></div>'
        for r in aggregate_table(doc)
    )
    rows = iou_table(doc)

    def swatch(i: int, text: str) -> str:
        r, g, b, _ = colours.get(i, (120, 120, 120, 255))
        return f'<span class="sw" style="background:#{r:02x}{g:02x}{b:02x}"></span>{text}'

    numeric = set(rows[0]) - {"class"} if rows else set()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>tileseg evaluation: {e(str(pred))}</title><style>{_CSS}</style></head><body><main>",
        "<h1>tileseg evaluation report</h1>",
        f'<p class="sub">Prediction <code>{e(str(pred))}</code> against ground truth <code>{e(str(gt))}</code>'
        f" &middot; area: {e(str(doc.get('area', 'whole raster')))} &middot; {doc['evaluated_pixels']:,} pixels evaluated"
        f" ({doc['evaluated_area']:,.2f} {e(doc['area_unit'])})</p>",
        f'<section id="summary"><div class="cards">{cards}</div></section>',
        '<h2>Per class</h2><section id="per-class">',
        _table(rows, numeric, swatch),
        f'<p class="small">Areas in {e(doc["area_unit"])}: {e(doc["area_unit_note"])}. '
        "Undefined values (0/0) are n/a, never 0.</p>",
        f'<p class="note">{e(not_applicable_sentence(doc))}</p></section>',
        "<h2>Confusion matrix</h2>",
        _fig("confusion-heatmap", heatmaps_png(m, names), "confusion matrix heat maps",
             "Rows: ground truth; columns: prediction. Left: share of each ground-truth class (rows sum to 100 %); "
             "right: pixel counts on a log colour scale. Grey: no pixel."),  # fmt: skip
        "<h2>IoU per class</h2>",
        _fig("iou-bar-chart", iou_bars_png(m, names, colours), "per-class IoU bar chart",
             "IoU per class in the class colours; dashed line: macro mIoU over applicable classes."),  # fmt: skip
    ]
    if quick is not None and extent is not None:
        every = "every pixel" if quick.step == 1 else f"1 pixel in {quick.step} along x and y (nearest)"
        caption = (f"Evaluation area, {every}: {quick.pred.shape[1]} x {quick.pred.shape[0]} px shown "
                   f"of {int(quick.window.width)} x {int(quick.window.height)}. Image: "
                   f"{doc.get('image_validity', '')}; 2-98 % stretch. Error map: green correct, red wrong, "
                   "grey excluded, white no prediction.")  # fmt: skip
        err_nodata = int(doc.get("error_map", {}).get("nodata", 255))
        parts += ["<h2>Quicklook</h2>",
                  _fig("quicklook", quicklook_png(quick, names, colours, extent, err_nodata), "quicklook", caption)]  # fmt: skip
    parts += [
        "<h2>Evaluated and excluded pixels</h2>",
        f"<p>The evaluation mask is area &and; valid(image) &and; valid(ground truth) &and; valid(prediction). "
        f"{e(doc['exclusion_rules']['order'].capitalize())}. Image validity: {e(str(doc.get('image_validity', 'n/a')))}.</p>",
        f'<section id="exclusions">{_table(exclusion_table(doc), {"count", "share"})}</section>',
        "<h2>Confusion matrix (counts)</h2>",
        _table([{"ground truth \\ prediction": n, **{p: f"{int(v):,}" for p, v in zip(names, row)}}
                for n, row in zip(names, doc["confusion_matrix"]["counts"])], set(names)),  # fmt: skip
        "<h2>Definitions</h2>",
        _table([{"metric": r["metric"], "definition": r["definition"]} for r in aggregate_table(doc)]),
        '<p class="small">Per class: IoU = TP / (TP + FP + FN) (Jaccard 1912); Dice/F1 = 2 TP / (2 TP + FP + FN) '
        "(Dice 1945, Sørensen 1948); precision = TP / (TP + FP); recall = TP / (TP + FN). All from one confusion "
        "matrix accumulated over every chunk; a class is not applicable when it is absent from both ground truth "
        "and prediction, or ignored.</p>",
        "<h2>Inputs and provenance</h2>",
        _table([{"input": k, "path": v.get("path"), "SHA-256": v.get("sha256") or "n/a", "of": v.get("of", "not computed")}
                for k, v in inputs.items()]),  # fmt: skip
        f'<p class="small">tileseg {e(doc["tileseg_version"])} &middot; config hash <code>{e(str(doc.get("config_hash")))}</code> '
        f"(of the {e(str(doc.get('config_hash_of', 'settings')))}) &middot; created {e(doc['created'])} &middot; "
        f"grid {e(str(doc['grid']['crs']))}, {doc['grid']['width']} x {doc['grid']['height']} px &middot; "
        f"error map <code>{e(str(doc.get('error_map', {}).get('path', 'n/a')))}</code></p>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- object-level page
def threshold_curves_png(metrics: dict[str, Any]) -> str:
    """Precision, recall, F1 and AP (DSB) against the IoU threshold, as a base64 PNG."""
    per, ts = metrics["per_threshold"], metrics["thresholds"]
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    for key, label in (("precision", "precision"), ("recall", "recall"), ("f1", "F1"), ("ap", "AP (DSB)")):
        ys = [np.nan if v is None else v for v in per[key]]
        ax.plot(ts, ys, marker="o", ms=3, label=label)
    ax.set_xlabel("IoU threshold")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def render_instances(doc: dict[str, Any]) -> str:
    """The object-level report (``report_instances.json``'s document) as one self-contained
    HTML page: summary cards, the per-threshold table, the threshold curves, definitions
    and provenance."""
    e = html.escape
    m = metrics = doc["metrics"]
    per = metrics["per_threshold"]

    def f(x: Any) -> str:
        return "n/a" if x is None else (f"{x:.4f}" if isinstance(x, float) else f"{x:,}")

    k50 = metrics["thresholds"].index(0.5) if 0.5 in metrics["thresholds"] else 0
    cards = [("ground-truth objects", f(m["n_ground_truth"])), ("predicted objects", f(m["n_predicted"])),
             ("F1 at IoU 0.5", f(m["f1_at_0.5"])), ("AP at IoU 0.5", f(per["ap"][k50])),
             ("mean AP 0.50:0.95", f(m["mean_ap"])), ("PQ", f(m["pq"]))]  # fmt: skip
    rows = [{"IoU >": f"{t:.2f}", **{name: f(per[key][i]) for key, name in
             (("tp", "TP"), ("fp", "FP"), ("fn", "FN"), ("precision", "precision"), ("recall", "recall"),
              ("f1", "F1"), ("ap", "AP (DSB)"), ("mean_matched_iou", "mean matched IoU"), ("pq", "PQ"))}}
            for i, t in enumerate(metrics["thresholds"])]  # fmt: skip
    gt = doc.get("ground_truth", {})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>tileseg object-level evaluation: {e(str(doc.get('prediction')))}</title><style>{_CSS}</style>"
        "</head><body><main>",
        "<h1>tileseg object-level evaluation</h1>",
        f'<p class="sub">Instances in <code>{e(str(doc.get("prediction")))}</code> against '
        f"<code>{e(str(gt.get('path')))}</code></p>",
        '<section id="summary"><div class="cards">'
        + "".join(f'<div class="card"><div class="v">{e(v)}</div><div class="n">{e(n)}</div></div>' for n, v in cards)
        + "</div></section>",
        '<h2>Per IoU threshold</h2><section id="per-threshold">',
        _table(rows, set(rows[0]) - {"IoU >"} if rows else set()),
        "</section>",
        _fig("threshold-curves", threshold_curves_png(metrics), "metrics against the IoU threshold",
             "Precision, recall, F1 and the Data Science Bowl AP at each matching threshold."),  # fmt: skip
        "<h2>Definitions</h2>",
        _table([{"term": k, "definition": v} for k, v in metrics["definitions"].items()]),
        "<h2>Provenance</h2>",
        f'<p class="small">tileseg {e(str(doc.get("tileseg_version")))} &middot; config hash '
        f'<code>{e(str(doc.get("config_hash")))}</code> &middot; ground truth SHA-256 '
        f'<code>{e(str(gt.get("sha256")))}</code></p>',
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"
