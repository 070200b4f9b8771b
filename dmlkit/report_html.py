"""The report as one self-contained HTML page: styles, scripts, charts (inline SVG) and thumbnails
(data: URLs) are all in the file, which a Content-Security-Policy forbids from loading anything
else, so it opens offline and can be sent to a colleague.

Sections: the runs side by side (test metrics from results.json / mlrc.json, the split that chose
the epoch, the settings that differ), training and validation curves, per-class metrics (sortable),
the most confused class pairs, the worst and some random queries with their nearest test images,
and a 2-D map of the test embeddings with each image on hover.
"""

from __future__ import annotations

import datetime
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dmlkit.report import CURVES, chosen_epoch, class_names, curve_runs, epoch_series, shown_metrics
from dmlkit.report_data import (
    Embedded,
    Examples,
    Thumbnails,
    embedding_map,
    example_queries,
    map_sample,
    query_items,
    recomputed_metrics,
)

PALETTE = (
    "#1f77b4 #ff7f0e #2ca02c #d62728 #9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf "
    "#aec7e8 #ffbb78 #98df8a #ff9896 #c5b0d5 #c49c94 #f7b6d2 #c7c7c7 #dbdb8d #9edae5"
).split()
HIGHER_IS_BETTER = ("precision_at_1", "r_precision", "map_at_r", "nmi", "ami")
METRIC_NAMES = {"precision_at_1": "P@1", "r_precision": "R-Precision", "map_at_r": "MAP@R", "nmi": "NMI", "ami": "AMI"}
#: Per-class tables longer than this show the lowest and highest half of it (by the first run's MAP@R).
MAX_CLASS_ROWS = 1000
#: Recomputed test metrics further than this from results.json make the page warn.
TOLERANCE = 1e-4
e = html.escape


def analyse(
    run: dict[str, Any],
    data: Embedded,
    method: str,
    top_k: int = 5,
    worst: int = 6,
    random: int = 4,
    map_points: int = 1000,
    max_queries: int = 5000,
) -> dict[str, Any]:
    """Everything the page shows of one run's test set, from its embeddings."""
    metrics = recomputed_metrics(data)
    shown = shown_metrics(run)
    differ = {
        k: (shown[k], metrics[k])
        for k in shown
        if isinstance(shown[k], float) and isinstance(metrics.get(k), float) and abs(shown[k] - metrics[k]) > TOLERANCE
    }
    sample = map_sample(len(data.split.labels), map_points)
    return {
        "name": run["name"],
        "data": data,
        "metrics": metrics,
        "differ": differ,
        "examples": example_queries(data, top_k, worst, random, max_queries),
        "map": {"items": sample, "xy": embedding_map(data.embeddings[sample], method), "method": method},
    }


def write_page(
    path: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]], analyses: list[dict[str, Any]]
) -> Path:
    """Write the page for ``runs`` (their summary ``rows`` and :func:`analyse` results) to ``path``."""
    from dmlkit.rundir import writable_error, write_text

    try:
        write_text(path, page(runs, rows, analyses))
    except OSError as exc:
        raise writable_error(path, exc, "file") from None
    return path


def page(runs: list[dict[str, Any]], rows: list[dict[str, Any]], analyses: list[dict[str, Any]]) -> str:
    """The page's HTML text."""
    import dmlkit

    thumbs = Thumbnails()
    title = "dmlkit report: " + ", ".join(r["name"] for r in runs)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        ("runs", "Runs", runs_section(runs, rows, analyses)),
        ("settings", "Settings that differ", settings_section(runs)),
        ("curves", "Training and validation curves", curves_section(runs, rows)),
        ("classes", "Per-class metrics", class_section(analyses)),
        ("confused", "Most confused class pairs", per_run(analyses, confusion_table)),
        ("worst", "Worst queries", examples_section(analyses, thumbs, "worst")),
        ("random", "Random queries", examples_section(analyses, thumbs, "random")),
        ("map", "Map of the test embeddings", per_run(analyses, lambda a: map_panel(a, thumbs))),
    ]
    nav = " ".join(f'<a href="#{key}">{e(name)}</a>' for key, name, _ in sections)
    body = "\n".join(f'<section id="{key}"><h2>{e(name)}</h2>\n{content}</section>' for key, name, content in sections)
    images = json.dumps(thumbs.urls).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{e(title)}</title>
<style>{STYLE}</style></head>
<body>
<header><h1>{e(title)}</h1>
<p class="meta">Written by dmlkit {e(dmlkit.__version__)} on {stamp}. {e(_selection_note(rows))}
One file: it opens offline.</p>
<nav>{nav}</nav></header>
{body}
<div id="tip" hidden><img alt=""><span></span></div>
<script type="application/json" id="images">{images}</script>
<script>{SCRIPT}</script>
</body></html>
"""


# -- runs and settings ----------------------------------------------------------------------------
def _selection_note(rows: list[dict[str, Any]]) -> str:
    on_test = [r["run"] for r in rows if r.get("selection_split") == "test"]
    if not on_test:
        return "Each run is shown at the epoch its own selection chose on validation data; the test set chose nothing."
    return (
        f"Each run is shown at the epoch its own selection chose; for {', '.join(on_test)} that was the test set "
        "(no results.json), so its numbers are optimistic."
    )


def _fmt(v: Any, key: str = "") -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if key.endswith("_s") else f"{v:.4f}"
    return str(v)


def _metric_keys(rows: list[dict[str, Any]]) -> list[str]:
    recall = sorted({k for r in rows for k in r if k.startswith("recall_at_")}, key=lambda k: int(k[10:]))
    ordered = [*HIGHER_IS_BETTER[:3], *recall, *HIGHER_IS_BETTER[3:]]
    others = sorted(
        {k for r in rows for k, v in r.items() if isinstance(v, float) and k not in ordered}
        - {"train_time_s", "wall_time_s"}
    )
    return [k for k in ordered if any(k in r for r in rows)] + others


def metric_name(key: str) -> str:
    """P@1, MAP@R, Recall@4, ... for a metric key."""
    return f"Recall@{key[10:]}" if key.startswith("recall_at_") else METRIC_NAMES.get(key, key)


def interval(run: dict[str, Any], key: str) -> tuple[float, float] | None:
    """The 95% confidence interval of a test metric, when results.json carries one (``test_ci``:
    ``{metric: [low, high]}``); None until bootstrap intervals are computed (issue 28)."""
    ci = (run.get("results") or {}).get("test_ci", {})
    value = ci.get(key) if isinstance(ci, dict) else None
    return (float(value[0]), float(value[1])) if isinstance(value, list | tuple) and len(value) == 2 else None


def runs_section(runs: list[dict[str, Any]], rows: list[dict[str, Any]], analyses: list[dict[str, Any]]) -> str:
    """The runs side by side: what they trained, the epoch chosen and by which split, the test metrics."""
    head = "".join(f"<th>{e(r['run'])}</th>" for r in rows)
    facts = [
        ("dataset", "dataset"),
        ("loss", "loss"),
        ("miner", "miner"),
        ("epochs trained", "epochs"),
        ("chosen epoch", "best_epoch"),
        ("chosen by", "selected_by"),
        ("selection split", "selection_split"),
        ("training time (s)", "train_time_s"),
        ("wall time (s), with caches and evaluation", "wall_time_s"),
    ]
    if any("protocol" in r for r in rows):
        facts.insert(3, ("protocol", "protocol"))
    out = [f'<table class="runs"><thead><tr><th></th>{head}</tr></thead><tbody>']
    for label, key in facts:
        out.append(_row(label, [_fmt(r.get(key, "-"), key) for r in rows]))
    if analyses:
        out.append(_row("test queries", [f"{a['examples'].queries:,}" for a in analyses]))
    out.append('<tr class="group"><th colspan="99">test metrics at the chosen epoch (from results.json)</th></tr>')
    for key in _metric_keys(rows):
        values = [r.get(key) for r in rows]
        # the best in bold where higher is better: the retrieval and clustering metrics, not an evaluator's own
        best = max((v for v in values if isinstance(v, float)), default=None)
        if key not in HIGHER_IS_BETTER and not key.startswith("recall_at_"):
            best = None
        cells = []
        for i, v in enumerate(values):
            if not isinstance(v, float):
                cells.append("<td>-</td>")
                continue
            cls = "num best" if v == best and len(rows) > 1 else "num"
            cells.append(
                f'<td class="{cls}" data-metric="{e(key)}" data-run="{e(rows[i]["run"])}" data-value="{v!r}">{v:.4f}</td>'
            )
        out.append(f"<tr><th>{e(metric_name(key))}</th>{''.join(cells)}</tr>")
    cis = []
    for run in runs:
        ci = {k: interval(run, k) for k in ("precision_at_1", "map_at_r")}
        shown = [f"{metric_name(k)} {lo:.4f}-{hi:.4f}" for k, v in ci.items() if v for lo, hi in [v]]
        cis.append(f"<td>{e('; '.join(shown))}</td>" if shown else '<td class="todo">not computed yet</td>')
    out.append(f'<tr class="ci"><th>95% confidence interval</th>{"".join(cis)}</tr>')
    out.append("</tbody></table>")
    out.append(
        '<p class="note">Confidence intervals: this row is kept for the bootstrap intervals over queries that '
        "results.json will carry (issue 28); until then a difference in the third decimal may be noise.</p>"
    )
    for a in analyses:
        if a["differ"]:
            diffs = ", ".join(f"{metric_name(k)} {s:.4f} in the file, {m:.4f} now" for k, (s, m) in a["differ"].items())
            out.append(
                f'<p class="warn">{e(a["name"])}: the test metrics recomputed from the checkpoint differ from '
                f"its results file ({e(diffs)}): the data, the code, the checkpoint or the device (bf16 autocast on a GPU) "
                "changed since training. "
                "The examples below come from the checkpoint as it is now.</p>"
            )
    for run, row in zip(runs, rows, strict=True):
        if run.get("protocol") == "mlrc":
            out.append(fold_table(run, row))
    return "\n".join(out)


def _row(label: str, values: list[str]) -> str:
    return f"<tr><th>{e(label)}</th>{''.join(f'<td>{e(v)}</td>' for v in values)}</tr>"


def fold_table(run: dict[str, Any], row: dict[str, Any]) -> str:
    """An mlrc run's fold models: the epoch each validation fold chose and its test metrics."""
    keys = [k for k in ("precision_at_1", "map_at_r") if k in row]
    head = "".join(f"<th>test {metric_name(k)}</th>" for k in keys)
    out = [f'<table class="folds"><caption>{e(run["name"])}: the fold models (--protocol mlrc)</caption>']
    out.append(f"<thead><tr><th>fold</th><th>chosen epoch</th><th>chosen by</th>{head}</tr></thead><tbody>")
    for f in row["folds"]:
        cells = "".join(
            f'<td class="num" data-metric="{k}" data-run="{e(f["run"])}" data-value="{f[k]!r}">{f[k]:.4f}</td>'
            for k in keys
            if k in f
        )
        out.append(
            f"<tr><td>{e(f['run'])}</td><td>{f.get('best_epoch')}</td><td>{e(f.get('selected_by', '?'))}</td>{cells}</tr>"
        )
    return "".join(out) + "</tbody></table>"


def flat_settings(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's settings under dotted names (``train.lr``, ``loss.margin``)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: Settings that name where a run was written or which fold it was: they differ without meaning.
NOT_SETTINGS = ("train.run_dir", "train.fold")


def differing_settings(runs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The settings whose values are not the same in every run (absent: None)."""
    flats = [flat_settings(r["config"]) for r in runs]
    keys = sorted({k for f in flats for k in f} - set(NOT_SETTINGS))

    def same(v: Any) -> str:  # 512 and 512.0 are the same setting (a resumed run's config may write either)
        return json.dumps(int(v) if isinstance(v, float) and v.is_integer() else v)

    return {k: [f.get(k) for f in flats] for k in keys if len({same(f.get(k)) for f in flats}) > 1}


def _setting(v: Any) -> str:
    if v is None:
        return "-"
    if v == "":
        return "(none)"
    return v if isinstance(v, str) else json.dumps(v)


def settings_section(runs: list[dict[str, Any]]) -> str:
    if len(runs) < 2:
        return '<p class="note">One run: nothing to compare. Its settings are in its config.toml.</p>'
    differ = differing_settings(runs)
    if not differ:
        return '<p class="note">The runs have the same settings (config.toml).</p>'
    head = "".join(f"<th>{e(r['name'])}</th>" for r in runs)
    body = "".join(_row(k, [_setting(v) for v in vals]) for k, vals in differ.items())
    return f'<table class="settings"><thead><tr><th>setting</th>{head}</tr></thead><tbody>{body}</tbody></table>'


# -- curves ---------------------------------------------------------------------------------------
def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) within [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(i * step, 12) for i in range(first, math.floor(hi / step + 1e-9) + 1)]


def line_chart(
    title: str, series: list[dict[str, Any]], xlabel: str, xticks: list[tuple[float, str]] | None = None
) -> str:
    """An inline SVG chart: one line per series (label, colour, points), ``mark`` circled; integer
    x ticks unless ``xticks`` gives them; each point's value in its tooltip."""
    pts = [p for s in series for p in s["points"]]
    if not pts:
        return f'<div class="chart empty"><b>{e(title)}</b><p>No run logged this per epoch.</p></div>'
    w, h, left, right, top, bottom = 440, 250, 52, 12, 26, 38
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or max(abs(y0) * 0.05, 0.01)
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def sy(y: float) -> float:
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    if xticks is None:
        step = max(1, math.ceil((x1 - x0) / 10))
        xticks = [(x, str(x)) for x in range(math.ceil(x0), math.floor(x1) + 1, step)]
    out = [f'<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">']
    out.append(f'<text x="{w / 2}" y="16" class="title">{e(title)}</text>')
    for y in nice_ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>')
        out.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" class="yt">{y:g}</text>')
    for x, label in xticks:
        out.append(f'<text x="{sx(x):.1f}" y="{h - bottom + 14}" class="xt">{e(label)}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 6}" class="xl">{e(xlabel)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" class="frame"/>')
    for s in series:
        if not s["points"]:
            continue
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s["points"])
        out.append(f'<polyline points="{line}" stroke="{s["colour"]}" class="line"/>')
        for x, y in s["points"]:
            tip = f"{s['label']}, {xlabel} {x:g}: {y:.4f}"
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s["colour"]}"><title>{e(tip)}</title></circle>'
            )
            if s.get("mark") == x:
                out.append(
                    f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="8" class="mark" stroke="{s["colour"]}">'
                    f"<title>{e(s['label'])}: the chosen epoch, {x:g}</title></circle>"
                )
    out.append("</svg>")
    return "".join(out)


def legend(series: list[dict[str, Any]], extra: str = "") -> str:
    """Colour swatches naming each series (``extra``: one more item's HTML)."""
    items = "".join(f'<span><i style="background:{s["colour"]}"></i>{e(s["label"])}</span>' for s in series)
    return f'<div class="legend">{items}{extra}</div>'


def curves_section(runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Training loss and validation metrics per epoch, each run's chosen epoch circled; Recall@K."""
    parts = curve_runs(runs)
    charts = []
    all_series = []
    for key, title in [("loss", "training loss"), *((k, f"validation {v}") for k, v in CURVES.items())]:
        series = []
        for i, run in enumerate(parts):
            split, pts = epoch_series(run, key)
            label = run["name"] if split in ("train", "val") else f"{run['name']} (test each epoch)"
            series.append(
                {"label": label, "colour": PALETTE[i % len(PALETTE)], "points": pts, "mark": chosen_epoch(run)}
            )
        charts.append(line_chart(title, series, "epoch"))
        all_series = all_series or series
    ring = '<span><i class="ring"></i>the epoch each run chose</span>'
    ks = sorted({int(k[10:]) for r in rows for k in r if k.startswith("recall_at_")})
    recall = [
        {
            "label": r["run"],
            "colour": PALETTE[i % len(PALETTE)],
            "points": [(math.log2(k), r[f"recall_at_{k}"]) for k in ks if f"recall_at_{k}" in r],
        }
        for i, r in enumerate(rows)
    ]
    ticks = [(math.log2(k), str(k)) for k in ks]
    recall_chart = line_chart("test Recall@K at the chosen epoch", recall, "K", ticks) + legend(recall)
    note = (
        '<p class="note">Validation curves are measured on the held-out validation split during training; '
        "the test set is read once, at the chosen epoch. A run that tested every epoch and logged no validation "
        "metric is drawn with its test values, labelled so.</p>"
    )
    return (
        f'<div class="charts">{"".join(charts)}</div>{legend(all_series, ring)}{note}'
        f'<div class="charts"><div>{recall_chart}</div></div>'
    )


# -- per class and confusions ----------------------------------------------------------------------
def per_run(analyses: list[dict[str, Any]], panel: Any) -> str:
    """One panel per run, side by side."""
    panels = "".join(f'<div data-run="{e(a["name"])}"><h3>{e(a["name"])}</h3>{panel(a)}</div>' for a in analyses)
    return f'<div class="per-run">{panels}</div>'


def _class_key(a: dict[str, Any], label: int, names: list[str], shared: bool) -> str:
    return names[label] if shared else f"{a['name']}: {names[label]}"


def class_section(analyses: list[dict[str, Any]]) -> str:
    """One sortable table, a row per test class, P@1 and MAP@R for each run (and their difference
    for two runs on the same test set)."""
    if not analyses:
        return ""
    shared = len({tuple(a["data"].split.labels.tolist()) for a in analyses}) == 1
    rows: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(analyses):
        split = a["data"].split
        names = class_names(split)
        queries = np.bincount(split.labels[query_items(split)], minlength=split.num_classes)
        for label, m in a["metrics"].get("per_class", {}).items():
            row = rows.setdefault(_class_key(a, int(label), names, shared), {"queries": int(queries[int(label)])})
            row[i] = m
    cols = [(i, k) for i in range(len(analyses)) for k in ("precision_at_1", "map_at_r")]
    first = [k for k in rows if 0 in rows[k]]
    order = sorted(rows, key=lambda k: (rows[k].get(0, {}).get("map_at_r", 2.0), k))
    note = f"{len(rows):,} classes; click a column to sort."
    if len(order) > MAX_CLASS_ROWS:
        half = MAX_CLASS_ROWS // 2
        ranked = sorted(first, key=lambda k: rows[k][0]["map_at_r"])
        keep = set(ranked[:half]) | set(ranked[-half:])
        order = [k for k in order if k in keep]
        note = (
            f"{len(rows):,} classes: the {half} with the lowest and the {half} with the highest MAP@R of "
            f"{analyses[0]['name']} are shown; click a column to sort."
        )
    diff = shared and len(analyses) == 2
    head = "".join(f"<th>{e(analyses[i]['name'])}<br>{metric_name(k)}</th>" for i, k in cols)
    if diff:
        head += f"<th>MAP@R<br>{e(analyses[1]['name'])} - {e(analyses[0]['name'])}</th>"
    body = []
    for name in order:
        row = rows[name]
        cells = [f'<td>{e(name)}</td><td class="num" data-sort="{row["queries"]}">{row["queries"]}</td>']
        for i, k in cols:
            v = row.get(i, {}).get(k)
            cells.append(
                f'<td class="num" data-sort="{v!r}">{v:.4f}</td>' if v is not None else '<td data-sort="">-</td>'
            )
        if diff:
            a, b = row.get(0, {}).get("map_at_r"), row.get(1, {}).get("map_at_r")
            cells.append(
                f'<td class="num" data-sort="{b - a!r}">{b - a:+.4f}</td>' if None not in (a, b) else "<td>-</td>"
            )
        body.append(f'<tr data-class="{e(name)}">{"".join(cells)}</tr>')
    return (
        f'<p class="note">{e(note)} Queries whose class has no other test item are left out, as in the metrics.</p>'
        f'<div class="scroll"><table class="sortable classes"><thead><tr><th>class</th><th>queries</th>{head}</tr>'
        f"</thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def confusion_table(a: dict[str, Any]) -> str:
    ex: Examples = a["examples"]
    names = class_names(a["data"].split)
    if not ex.confusions:
        return f'<p class="note">No query has another class among its {ex.top_k} nearest test images.</p>'
    body = "".join(
        f"<tr><td>{e(names[c['a']])}</td><td>{e(names[c['b']])}</td><td class='num'>{c['a_to_b']}</td>"
        f"<td class='num'>{c['b_to_a']}</td><td class='num'>{c['share']:.3f}</td></tr>"
        for c in ex.confusions
    )
    return (
        f'<p class="note">Among the {ex.top_k} nearest test images of {_searched(ex)}: A&rarr;B counts images of B '
        "in the top k of A's queries; share: both counts over the top-k places of both classes' queries.</p>"
        '<table class="sortable"><thead><tr><th>class A</th><th>class B</th><th>A&rarr;B</th><th>B&rarr;A</th>'
        f"<th>share</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _searched(ex: Examples) -> str:
    if ex.searched == ex.queries:
        return f"all {ex.queries:,} test queries"
    return f"{ex.searched:,} of the {ex.queries:,} test queries (a random sample)"


# -- examples and the map ---------------------------------------------------------------------------
def _tile(thumbs: Thumbnails, split: Any, index: int, caption: str, cls: str) -> str:
    img = f'<img data-img="{thumbs.id(split.items[index])}" alt="">'
    return f'<figure class="{cls}" data-item="{index}">{img}<figcaption>{caption}</figcaption></figure>'


def example_rows(a: dict[str, Any], thumbs: Thumbnails, which: str) -> str:
    ex: Examples = a["examples"]
    split = a["data"].split
    names = class_names(split)
    rows = []
    for q in getattr(ex, which):
        tiles = [_tile(thumbs, split, q["query"], f"query<br>{e(names[q['label']])}", "query")]
        for rank, (item, d, ok) in enumerate(zip(q["neighbours"], q["distances"], q["correct"], strict=True), 1):
            cap = f"#{rank} {e(names[split.labels[item]])}<br>d = {d:.3f}"
            tiles.append(_tile(thumbs, split, item, cap, "ok" if ok else "bad"))
        rows.append(f'<div class="ex">{"".join(tiles)}</div>')
    if which == "worst":
        how = (
            f"with the fewest images of their class among their {ex.top_k} nearest, then the closest wrong neighbour, "
            f"among {_searched(ex)}"
        )
    else:
        how = f"drawn at random from {_searched(ex)}"
    return f'<p class="note">Queries {how}.</p>' + ("".join(rows) or '<p class="note">None.</p>')


def examples_section(analyses: list[dict[str, Any]], thumbs: Thumbnails, which: str) -> str:
    key = (
        '<p class="key"><span class="k query">query</span><span class="k ok">same class as the query</span>'
        '<span class="k bad">another class</span> d: Euclidean distance between the embeddings.</p>'
    )
    return key + per_run(analyses, lambda a: example_rows(a, thumbs, which))


def map_panel(a: dict[str, Any], thumbs: Thumbnails) -> str:
    """A scatter plot of the map, coloured by class, each point's image and class on hover."""
    split, m = a["data"].split, a["map"]
    names = class_names(split)
    xy = m["xy"]
    w, h, pad = 520, 420, 12
    lo, hi = xy.min(0), xy.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    pts = pad + (xy - lo) / span * np.array([w - 2 * pad, h - 2 * pad])
    circles = []
    for (x, y), item in zip(pts, m["items"], strict=True):
        label = int(split.labels[item])
        circles.append(
            f'<circle cx="{x:.1f}" cy="{h - y:.1f}" r="3.5" fill="{PALETTE[label % len(PALETTE)]}" '
            f'data-img="{thumbs.id(split.items[item])}" data-name="{e(names[label])}"/>'
        )
    method = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}[m["method"]]
    n, total = len(m["items"]), len(split.labels)
    sampled = f"all {n:,} test images" if n == total else f"{n:,} of the {total:,} test images (a random sample)"
    colours = (
        "one colour per class"
        if split.num_classes <= len(PALETTE)
        else f"{split.num_classes:,} classes in {len(PALETTE)} colours (colours repeat)"
    )
    key = ""
    if split.num_classes <= len(PALETTE):
        key = legend([{"label": names[c], "colour": PALETTE[c]} for c in range(split.num_classes)])
    return (
        f'<p class="note">{method} of {sampled}; {colours}; hover over a point for its image and class.</p>'
        f'<svg class="map" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">'
        f'<rect x="0" y="0" width="{w}" height="{h}" class="frame"/>{"".join(circles)}</svg>{key}'
    )


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1500px;padding:0 20px 40px;color:#222}
header{border-bottom:1px solid #ddd;margin-bottom:8px}h1{font-size:22px;margin:16px 0 4px}h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #eee}
h3{font-size:15px;margin:6px 0}.meta,.note{color:#555;font-size:13px;margin:4px 0 8px}nav a{margin-right:14px}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}td.best{font-weight:700}
tr.group th{background:#fafafa;font-weight:600;color:#444}td.todo{color:#999;font-style:italic}caption{text-align:left;font-weight:600;padding:10px 0 4px}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:6px 10px}table.sortable th{cursor:pointer}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}table.sortable th[data-dir=desc]::after{content:" \\25BC"}
.scroll{max-height:480px;overflow:auto;display:inline-block;border:1px solid #eee}
.charts{display:flex;flex-wrap:wrap;gap:10px}svg.chart{background:#fff}svg .title{font-size:13px;text-anchor:middle;font-weight:600}
svg .xt{font-size:11px;text-anchor:middle}svg .yt{font-size:11px;text-anchor:end}svg .xl{font-size:12px;text-anchor:middle}
svg .grid{stroke:#eee}svg .frame{fill:none;stroke:#bbb}svg .line{fill:none;stroke-width:2}svg .mark{fill:none;stroke-width:2.5}
.legend span{margin-right:16px;font-size:13px;white-space:nowrap}.legend i{display:inline-block;width:12px;height:12px;margin-right:5px;vertical-align:-1px}
.legend i.ring{border:2.5px solid #555;border-radius:50%;width:9px;height:9px}
.per-run{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:18px}
.ex{display:flex;flex-wrap:wrap;gap:4px;margin:0 0 8px}figure{margin:0;text-align:center;font-size:11px;width:84px}
figure img{width:80px;height:80px;object-fit:contain;border:3px solid #888;background:#fafafa;display:block}
figure.query img{border-color:#222}figure.ok img{border-color:#2a9d2a}figure.bad img{border-color:#d62728}
figure.ok figcaption{color:#1d6f1d}figure.bad figcaption{color:#b01c1c}
.key .k{display:inline-block;padding:1px 8px;margin-right:10px;border:3px solid}.k.query{border-color:#222}.k.ok{border-color:#2a9d2a}.k.bad{border-color:#d62728}
svg.map circle{stroke:#fff;stroke-width:.5;cursor:crosshair}svg.map circle:hover{stroke:#000;stroke-width:1.5}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #999;padding:4px;font-size:12px;text-align:center;box-shadow:0 2px 6px #0003}
#tip img{display:block;width:96px;height:96px;object-fit:contain}
"""

SCRIPT = """
(function () {
  var images = JSON.parse(document.getElementById('images').textContent);
  document.querySelectorAll('img[data-img]').forEach(function (img) {
    var i = Number(img.dataset.img);
    if (i >= 0) { img.src = images[i]; } else { img.alt = 'file missing'; }
  });
  function key(cell) {
    var s = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent;
    var n = parseFloat(s);
    return isNaN(n) ? s.toLowerCase() : n;
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.addEventListener('click', function () {
        var asc = th.dataset.dir !== 'asc';
        Array.prototype.forEach.call(heads, function (h) { delete h.dataset.dir; });
        th.dataset.dir = asc ? 'asc' : 'desc';
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          if (typeof x !== typeof y) { return typeof x === 'number' ? -1 : 1; }
          return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var tip = document.getElementById('tip');
  document.querySelectorAll('svg.map').forEach(function (svg) {
    svg.addEventListener('mouseover', function (ev) {
      var c = ev.target;
      if (c.tagName !== 'circle') { return; }
      var i = Number(c.dataset.img);
      var img = tip.querySelector('img');
      if (i >= 0) { img.src = images[i]; } else { img.removeAttribute('src'); }
      tip.querySelector('span').textContent = c.dataset.name;
      tip.style.left = (ev.clientX + 14) + 'px';
      tip.style.top = (ev.clientY + 14) + 'px';
      tip.hidden = false;
    });
    svg.addEventListener('mouseout', function () { tip.hidden = true; });
  });
})();
"""
