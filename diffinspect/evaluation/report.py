"""Writing the evaluation report: report.json, summary.md and a self-contained report.html.

The HTML needs nothing but a browser: figures are PNG data URIs, the CSS is inline, nothing is fetched,
so it can be mailed or archived with a line's quality records.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HEADLINE = (("image_auroc", "image AUROC"), ("aupro", "AUPRO"), ("false_reject_rate", "false rejects"),
            ("miss_rate", "misses"), ("latency_ms", "ms / frame"))
COLUMNS = (("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("pixel_auroc", "pixel AUROC"),
           ("aupro", "AUPRO@30%"), ("false_reject_rate", "false-reject rate"), ("miss_rate", "miss rate"),
           ("precision", "precision"), ("recall", "recall"), ("f1", "F1"),
           ("f1_max_test_tuned", "F1-max (test-tuned)"), ("latency_ms", "ms / frame"))
DEFECT_COLUMNS = (("n", "images"), ("image_auroc", "image AUROC"), ("image_ap", "image AP"),
                  ("recall", "detected at threshold"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO@30%"))
GALLERY_SIDE = 256  # px: enough to see a defect, small enough to keep the file mailable


@dataclass
class GalleryItem:
    caption: str
    image: np.ndarray  # BGR uint8, as OpenCV and overlay.render_overlay produce


@dataclass
class MethodView:
    """What the figures need beyond report.json: per-image scores and the worst cases."""

    name: str
    kind: str
    labels: np.ndarray
    scores: np.ndarray
    threshold: float | None
    false_rejects: list[GalleryItem] = field(default_factory=list)
    misses: list[GalleryItem] = field(default_factory=list)


def write_report(report: dict, views: dict[str, list[MethodView]], report_dir: Path) -> dict[str, Path]:
    """Write the three files; return their paths."""
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": report_dir / "report.json", "markdown": report_dir / "summary.md",
             "html": report_dir / "report.html"}
    paths["json"].write_text(json.dumps(to_json(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(summary_markdown(report), encoding="utf-8")
    paths["html"].write_text(report_html(report, views), encoding="utf-8")
    return paths


def summarize(datasets: dict) -> dict:
    """Image AUROC per method and dataset, its mean over datasets, and the best method per dataset."""
    table: dict[str, dict[str, float | None]] = {}
    for ds, methods in datasets.items():
        for name, row in methods.items():
            table.setdefault(name, {})[ds] = row["image_auroc"]
    mean = {}
    for name, per_ds in table.items():
        vals = [v for v in per_ds.values() if v is not None]
        mean[name] = float(np.mean(vals)) if vals else None
    best = {}
    for ds, methods in datasets.items():
        scored = {n: r["image_auroc"] for n, r in methods.items() if r["image_auroc"] is not None}
        best[ds] = max(scored, key=scored.get) if scored else None
    return {"image_auroc": table, "mean_image_auroc": mean, "best_image_auroc": best}


def to_json(obj: object) -> object:
    """Plain JSON values: numpy scalars unwrapped, NaN and infinities as null (undefined)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _calibration_groups(rows: dict) -> list[tuple[list[str], str]]:
    """Methods sharing the same calibration sentence, so six baselines make one line, not six."""
    groups: dict[str, list[str]] = {}
    for m, r in rows.items():
        if r.get("calibration"):
            groups.setdefault(r["calibration"], []).append(m)
    return [(names, sentence) for sentence, names in groups.items()]


def _fmt(v: object, key: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if key in ("n", "n_images"):
        return str(int(v))
    if key == "latency_ms":
        return f"{float(v):.1f}" if float(v) >= 10 else f"{float(v):.2f}"
    return f"{float(v):.3f}"


def _cell(row: dict, key: str) -> str:
    """A table cell; the rates at the threshold carry their counts: "0.250 (3 of 12)"."""
    text = _fmt(row.get(key), key)
    count, of = {"false_reject_rate": ("false_rejects", "n_good"), "miss_rate": ("misses", "n_defective")}.get(
        key, (None, None))
    if count and row.get(count) is not None and row.get(of):
        text += f" ({row[count]} of {row[of]})"
    return text


def _model_lines(report: dict) -> list[str]:
    return [f"{name}: bundle {m['bundle']}, trained {m['training_steps']} steps, scored on {m['engine']} "
            f"({m['precision']})" for name, m in (report.get("models") or {}).items()]


# --- markdown --------------------------------------------------------------------------------------

def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def summary_markdown(report: dict) -> str:
    datasets = report["datasets"]
    methods = list(dict.fromkeys(m for ds in datasets.values() for m in ds))
    lines = ["# Evaluation summary", ""]
    if models := _model_lines(report):
        lines += [*(f"- {m}" for m in models), ""]
    lines += ["Image AUROC (methods × datasets):", ""]
    lines += _md_table(["method", *datasets], [[m, *(_fmt(datasets[d].get(m, {}).get("image_auroc"))
                                                      for d in datasets)] for m in methods])
    for ds, rows in datasets.items():
        lines += ["", f"## {ds}", ""]
        lines += _md_table(["method", *(label for _, label in COLUMNS)],
                           [[m, *(_cell(r, k) for k, _ in COLUMNS)] for m, r in rows.items()])
        calib = [f"- {', '.join(ms)}: {sentence}." for ms, sentence in _calibration_groups(rows)]
        if calib:
            lines += ["", "How the thresholds were set:", "", *calib]
    if report.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"


# --- figures ---------------------------------------------------------------------------------------

def _figure(width: float, height: float) -> Figure:
    # matplotlib writes a cache under $HOME unless told otherwise; one per-user temp dir keeps read-only
    # homes working without leaving a new folder behind at every run.
    if "MPLCONFIGDIR" not in os.environ:
        cache = Path(tempfile.gettempdir()) / f"diffinspect-mpl-{getattr(os, 'getuid', lambda: 0)()}"
        cache.mkdir(mode=0o700, exist_ok=True)
        os.environ["MPLCONFIGDIR"] = str(cache)
    from matplotlib.figure import Figure  # the OO API renders with Agg, no pyplot state or GUI backend

    # No layout engine: constrained layout cost seconds per figure; fixed margins fit these plots.
    return Figure(figsize=(width, height), dpi=90)


def _png_uri(fig_or_image: Figure | np.ndarray) -> str:
    if isinstance(fig_or_image, np.ndarray):
        ok, buf = cv2.imencode(".png", fig_or_image)
        data = buf.tobytes() if ok else b""
    else:
        out = io.BytesIO()
        fig_or_image.savefig(out, format="png")
        data = out.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _curves(views: list[MethodView]) -> str | None:
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    usable = [v for v in views if 0 < int(v.labels.sum()) < v.labels.size]
    if not usable:
        return None
    fig = _figure(10, 4.2)
    roc_ax, pr_ax = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
    for v in usable:
        style = "-" if v.kind == "detector" else "--"
        fpr, tpr, _ = roc_curve(v.labels, v.scores)
        roc_ax.plot(fpr, tpr, style, label=f"{v.name} ({auc(fpr, tpr):.3f})")
        prec, rec, _ = precision_recall_curve(v.labels, v.scores)
        pr_ax.plot(rec, prec, style, label=v.name)
    roc_ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
    roc_ax.set(xlabel="false-positive rate (good parts rejected)", ylabel="true-positive rate", title="ROC")
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    roc_ax.legend(fontsize=7, loc="lower right")
    pr_ax.legend(fontsize=7, loc="lower left")
    return _png_uri(fig)


def _histograms(views: list[MethodView]) -> str | None:
    if not views:
        return None
    cols = min(4, len(views))
    rows = math.ceil(len(views) / cols)
    fig = _figure(3.2 * cols, 2.4 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.92, wspace=0.25, hspace=0.45)
    for ax, v in zip(axes, views, strict=False):
        finite = v.scores[np.isfinite(v.scores)]
        if v.threshold is not None and math.isfinite(v.threshold):
            finite = np.append(finite, v.threshold)  # keep the threshold line inside the plotted range
        bins = np.histogram_bin_edges(finite, bins=30) if finite.size else 10
        ax.hist(v.scores[~v.labels], bins=bins, alpha=0.6, color="tab:green", label="good")
        ax.hist(v.scores[v.labels], bins=bins, alpha=0.6, color="tab:red", label="defective")
        if v.threshold is not None and math.isfinite(v.threshold):
            ax.axvline(v.threshold, color="black", ls="--", lw=1, label="threshold")
        ax.set_title(v.name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in axes[len(views):]:
        ax.set_visible(False)
    return _png_uri(fig)


# --- html ------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.5rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{border:1px solid #ddd;border-radius:8px;padding:.6rem 1rem;min-width:8rem}
.card .v{font-size:1.6rem;font-weight:600}.card .k{color:#666;font-size:.8rem}
.gallery{display:flex;flex-wrap:wrap;gap:.6rem}
figure{margin:0;max-width:260px}figcaption{font-size:.75rem;color:#555;word-break:break-all}
img.fig{max-width:100%}.note{color:#555;font-size:.9rem}
"""


def _h(s: object) -> str:
    return html.escape(str(s))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_h(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(uri: str | None, alt: str) -> str:
    return f'<img class="fig" alt="{_h(alt)}" src="{uri}">' if uri else ""


def _gallery(items: list[GalleryItem], empty: str) -> str:
    if not items:
        return f'<p class="note">{_h(empty)}</p>'
    cells = []
    for it in items:
        img = it.image
        scale = GALLERY_SIDE / max(img.shape[:2])
        if scale < 1:
            img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                             interpolation=cv2.INTER_AREA)
        cells.append(f'<figure><img alt="{_h(it.caption)}" src="{_png_uri(img)}">'
                     f"<figcaption>{_h(it.caption)}</figcaption></figure>")
    return '<div class="gallery">' + "".join(cells) + "</div>"


def _headline(name: str, row: dict) -> str:
    cards = "".join(f'<div class="card"><div class="v">{_cell(row, k)}</div>'
                    f'<div class="k">{_h(label)}</div></div>' for k, label in HEADLINE)
    return f"<p>Headline method: <b>{_h(name)}</b></p><div class=\"cards\">{cards}</div>"


def _robustness(rows: dict) -> str:
    with_rob = {m: r["robustness"] for m, r in rows.items() if r.get("robustness")}
    if not with_rob:
        return ""
    out = ["<h3>Robustness (image AUROC / false-reject rate at the calibrated threshold)</h3>"]
    kinds = list(next(iter(with_rob.values())))
    header = ["method", *(f"{k} s{s}" for k in kinds for s in ("1", "2", "3"))]
    for key, title in (("image_auroc", "image AUROC"), ("false_reject_rate", "false-reject rate")):
        table_rows = [[m, *(_fmt(rob.get(k, {}).get(s, {}).get(key)) for k in kinds for s in ("1", "2", "3"))]
                      for m, rob in with_rob.items()]
        out.append(f"<p>{_h(title)}</p>" + _table(header, table_rows))
    return "".join(out)


def _dataset_section(name: str, rows: dict, views: list[MethodView]) -> str:
    detectors = [m for m, r in rows.items() if r.get("kind") == "detector"]
    baselines = [m for m, r in rows.items() if r.get("kind") != "detector"]
    ranked = [m for m in baselines if rows[m].get("image_auroc") is not None]
    head = detectors[0] if detectors else (max(ranked, key=lambda m: rows[m]["image_auroc"]) if ranked
                                           else next(iter(rows), None))
    parts = [f"<h2>{_h(name)}</h2>"]
    if head is not None:
        parts.append(_headline(head, rows[head]))
    calib = [f"<li><b>{_h(', '.join(ms))}</b>: {_h(sentence)}.</li>"
             for ms, sentence in _calibration_groups(rows)]
    if calib:
        parts.append("<h3>How the thresholds were set</h3><ul>" + "".join(calib) + "</ul>")
    header = ["method", *(label for _, label in COLUMNS)]
    for title, names in (("Detectors", detectors), ("Baselines", baselines)):
        if names:
            cells = [[m, *(_cell(rows[m], k) for k, _ in COLUMNS)] for m in names]
            parts.append(f"<h3>{title}</h3>" + _table(header, cells))
    parts.append('<p class="note">F1-max (test-tuned) picks its threshold on these test images: an '
                 "optimistic figure, for comparison with papers. Every other threshold figure uses the "
                 "calibrated threshold.</p>")
    parts.append(_img(_curves(views), "ROC and precision-recall curves"))
    parts.append("<h3>Score distributions</h3>" + _img(_histograms(views), "score histograms"))
    for m in detectors or ([head] if head else []):
        per = rows[m].get("per_defect") or {}
        if per:
            parts.append(f"<h3>Per defect type: {_h(m)}</h3>" + _table(
                ["defect", *(label for _, label in DEFECT_COLUMNS)],
                [[d, *(_fmt(r.get(k), k) for k, _ in DEFECT_COLUMNS)] for d, r in per.items()]))
    parts.append(_robustness(rows))
    for v in views:
        if v.false_rejects or v.misses or v.name in detectors:
            parts.append(f"<h3>Worst cases: {_h(v.name)}</h3><h4>False rejects (good parts labelled NG)</h4>"
                         + _gallery(v.false_rejects, "none at the calibrated threshold")
                         + "<h4>Misses (defective parts labelled OK)</h4>"
                         + _gallery(v.misses, "none at the calibrated threshold"))
    return "".join(parts)


def report_html(report: dict, views: dict[str, list[MethodView]]) -> str:
    datasets = report["datasets"]
    methods = list(dict.fromkeys(m for ds in datasets.values() for m in ds))
    overview = _table(["method", *datasets], [[m, *(_fmt(datasets[d].get(m, {}).get("image_auroc"))
                                                      for d in datasets)] for m in methods])
    sections = "".join(_dataset_section(d, rows, views.get(d, [])) for d, rows in datasets.items())
    notes = "".join(f"<li>{_h(n)}</li>" for n in report.get("notes", []))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>diffinspect evaluation</title><style>{CSS}</style></head><body>"
            "<h1>Evaluation report</h1>"
            + "".join(f"<p>{_h(m)}</p>" for m in _model_lines(report)) +
            f"<h2>Image AUROC, methods × datasets</h2>{overview}{sections}"
            f"<h2>Notes</h2><ul class=\"note\">{notes}</ul></body></html>\n")
