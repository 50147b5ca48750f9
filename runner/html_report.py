"""The self-contained HTML report: tables, learning curves and confusion matrices in one file.

Images are PNG data URIs and the styles are inline: the file opens in any browser, offline, and
can be mailed or attached as it is. It loads nothing from the network and runs no scripts.
"""

from __future__ import annotations

import base64
from typing import Any, Sequence

import jinja2
from markupsafe import Markup

from runner.reports import Best, Report, plot_data
from runner.store import Store, utcnow

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0.2em; }
p.meta { color: #555; margin-top: 0; }
table.report { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
table.report th, table.report td { border: 1px solid #ccc; padding: 0.25em 0.6em; white-space: nowrap; }
table.report th { background: #eef2f7; text-align: left; }
table.report .num { text-align: right; font-variant-numeric: tabular-nums; }
table.report th.num { text-align: right; }
table.report td.text { text-align: left; }
table.report td[title] { cursor: help; }
table.report tr:nth-child(even) td { background: #fafafa; }
div.scroll { overflow-x: auto; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-weight: 600; margin-bottom: 0.4em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">Generated {{ generated }} UTC from {{ source }} &middot; {{ run_count }} run{{ "" if run_count == 1 else "s" }}</p>
{% if groups_html %}
<h2>Groups</h2>
<p class="meta">Mean, sample standard deviation and 95% confidence half-width (Student's t) per metric.</p>
{{ groups_html }}
{% endif %}
{% if sweep_figure or best_lines %}
<h2>Sweep</h2>
{% for line in best_lines %}<p class="meta">{{ line }}</p>
{% endfor %}
{% if sweep_figure %}<figure><figcaption>{{ sweep_metric }} against each swept key (mean ± 95% CI over seeds)</figcaption>
<img alt="{{ sweep_metric }} against each swept key" src="data:image/png;base64,{{ sweep_figure }}"></figure>{% endif %}
{% endif %}
<h2>Runs</h2>
{{ runs_html }}
{% if overlay %}
<h2>Learning curves, overlaid</h2>
<figure><img alt="learning curves of the runs, overlaid" src="data:image/png;base64,{{ overlay }}"></figure>
{% endif %}
{% if figures %}
<h2>Learning curves and test confusion matrices</h2>
{% if plotted < run_count %}<p class="meta">Figures for the first {{ plotted }} of {{ run_count }} runs (raise --max-plots for more).</p>{% endif %}
{% for figure in figures %}
<figure id="run-{{ figure.run_id }}">
<figcaption>{{ figure.name }} &middot; {{ figure.run_id }}</figcaption>
<img alt="learning curves and confusion matrix of {{ figure.name }} ({{ figure.run_id }})" src="data:image/png;base64,{{ figure.png }}">
</figure>
{% endfor %}
{% endif %}
</body>
</html>
"""


TABLE = """<div class="scroll"><table class="report">
<thead><tr>{% for column in columns %}<th class="{{ column.kind }}">{{ column.name }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in rows %}<tr>{% for cell in row %}<td class="{{ cell.kind }}"{% if cell.full %} title="{{ cell.full }}"{% endif %}>{{ cell.text }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table></div>"""

IDENTIFYING = ("id", "name", "status")
# what people open a report for: right after the identifying columns, so no scrolling hides them
HEADLINE_METRICS = ("test_accuracy", "best_val_accuracy", "test_f1_macro", "test_loss")
LAST = ("stop_reason", "weights_source", "started_at")  # long text that identifies nothing: at the end
LONG_TEXT = 28  # characters of a text cell shown; the whole text is its tooltip
NEVER_SHORTENED = ("id", "name")


def html_column_order(columns: list[str], first: tuple[str, ...] = ()) -> list[str]:
    """``first`` (group keys), the identifying columns, the headline metrics (and their group statistics), the rest,
    and long text last."""
    metrics = [*HEADLINE_METRICS, *sorted(c for c in columns if c.startswith("test_") and c.split("_")[-1] not in ("mean", "std", "ci95")
                                           and c not in HEADLINE_METRICS)]
    ordered = list(dict.fromkeys(c for c in (*first, *IDENTIFYING, "n") if c in columns))
    for metric in metrics:
        ordered += [c for c in columns if c not in ordered and (c == metric or c in (f"{metric}_mean", f"{metric}_std", f"{metric}_ci95"))]
    rest = [c for c in columns if c not in ordered]
    return [*ordered, *(c for c in rest if c not in LAST), *(c for c in rest if c in LAST)]


def _cells(frame: Any, column: str) -> tuple[str, list[dict[str, str]]]:
    """A column's kind (``num`` or ``text``) and its cells: numbers to 4 decimals, long text shortened, missing blank."""
    import pandas as pd

    values = frame[column]
    numeric = values.dtype.kind in "fiu" or str(values.dtype) == "Int64"
    cells = []
    for value in values.tolist():
        if pd.isna(value):
            cells.append({"text": "", "kind": "num" if numeric else "text", "full": ""})
        elif numeric:
            cells.append({"text": f"{value:.4f}" if isinstance(value, float) else str(value), "kind": "num", "full": ""})
        else:
            text = str(value)
            short = len(text) > LONG_TEXT and column not in NEVER_SHORTENED
            cells.append({"text": text[: LONG_TEXT - 1] + "…" if short else text, "kind": "text", "full": text if short else ""})
    return ("num" if numeric else "text"), cells


def _table_html(frame: Any, reorder: bool = True, first: tuple[str, ...] = ()) -> str:
    """The table with text left and numbers right, long text shortened (whole on hover); jinja escapes every cell."""
    columns = html_column_order(list(frame.columns), first) if reorder else list(frame.columns)
    kinds, cells = {}, {}
    for column in columns:
        kinds[column], cells[column] = _cells(frame, column)
    rows = [[cells[c][i] for c in columns] for i in range(len(frame))]
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TABLE).render(columns=[{"name": c, "kind": kinds[c]} for c in columns], rows=rows)


def _png_base64(figure: Any) -> str:
    from runner.plots import figure_bytes

    return base64.b64encode(figure_bytes(figure, "png")).decode("ascii")


def _group_keys(groups: Any) -> tuple[str, ...]:
    columns = list(groups.columns)
    return tuple(columns[: columns.index("n")])


def render_html(report: Report, store: Store | None, title: str = "runner report", max_plots: int = 20,
                swept: Sequence[str] = (), best: Best | None = None) -> str:
    """The whole report as one HTML document; figures for the first ``max_plots`` runs in report order.

    A sweep's report (``swept``: its keys, the report grouped by them) gets a section with the metric
    (``best``'s, else test accuracy) against each key, and the best configuration beside the runner-up.
    """
    sweep_metric = best.metric if best is not None else "test_accuracy"
    sweep_png = None
    if swept and report.groups is not None and f"{sweep_metric}_mean" in report.groups.columns:
        from runner.plots import sweep_figure

        sweep_png = _png_base64(sweep_figure(report.groups, list(swept), sweep_metric))
    plotted_ids = report.run_ids[: max(0, max_plots)] if store is not None else []
    figures, overlay = [], None
    if plotted_ids:
        from runner.plots import overlay_figure, runs_figure

        runs = plot_data(store, plotted_ids)
        figures = [{"run_id": run.run_id, "name": run.name, "png": _png_base64(runs_figure([run]))} for run in runs]
        if len(runs) > 1:
            overlay = _png_base64(overlay_figure(runs))
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE).render(
        title=title,
        generated=utcnow().isoformat(timespec="seconds"),
        source=store.location if store is not None else "a results store",
        run_count=len(report.run_ids),
        groups_html=Markup(_table_html(report.groups, not report.columns_chosen, first=_group_keys(report.groups)))
        if report.groups is not None else None,
        runs_html=Markup(_table_html(report.runs, not report.columns_chosen)),
        overlay=overlay,
        sweep_figure=sweep_png,
        sweep_metric=sweep_metric,
        best_lines=best.lines() if best is not None else [],
        figures=figures,
        plotted=len(figures),
    )
