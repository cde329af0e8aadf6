"""The drift report `genforge monitor report` writes: for each feature, the reference and
current distributions drawn side by side (matplotlib PNGs), every test's statistic and
p-value, the Holm-corrected verdict, and the PSI level; as a self-contained HTML page (plots
embedded) or Markdown (plots in a folder beside it)."""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, atomic_write_text
from .drift import DriftReport

__all__ = ["feature_plot_png", "write_drift_report", "drift_markdown", "drift_html"]


def feature_plot_png(name: str, reference: Sequence, current: Sequence) -> bytes:
    """A PNG of one feature's two windows: overlaid density histograms for numbers, bars of
    each category's share for categories and rates. Drawn with matplotlib's Agg canvas
    directly, so the global pyplot state is never touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0, 2.8), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in list(reference) + list(current))
    if numeric:
        a, b = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
        edges = np.histogram_bin_edges(np.concatenate([a, b]), bins=30)
        axes.hist(a, bins=edges, density=True, alpha=0.55, label=f"reference (n={a.size})", color="#4c72b0")
        axes.hist(b, bins=edges, density=True, alpha=0.55, label=f"current (n={b.size})", color="#dd8452")
        axes.set_ylabel("density")
    else:
        labels = sorted({str(v) for v in list(reference) + list(current)})
        share_a, share_b = Counter(map(str, reference)), Counter(map(str, current))
        x = np.arange(len(labels))
        axes.bar(x - 0.2, [share_a[k] / len(reference) for k in labels], 0.4, label="reference", color="#4c72b0")
        axes.bar(x + 0.2, [share_b[k] / len(current) for k in labels], 0.4, label="current", color="#dd8452")
        axes.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0, fontsize=8)
        axes.set_ylabel("share")
    axes.set_title(name, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _rows(report: DriftReport) -> list[dict]:
    rows = []
    for test, adjusted in zip(report.tests, report.adjusted_p_values):
        level = test.details.get("level")
        if adjusted is None:
            verdict = f"PSI {level}"
        else:
            verdict = "DRIFT" if adjusted < report.alpha else "ok"
        rows.append(
            {
                "feature": test.feature,
                "test": test.test,
                "statistic": f"{test.statistic:.4g}",
                "p": f"{test.p_value:.3g}",
                "holm": "-" if adjusted is None else f"{adjusted:.3g}",
                "verdict": verdict,
                "n": f"{test.n_reference} / {test.n_current}",
            }
        )
    return rows


def _summary(report: DriftReport, title: str) -> tuple[str, str]:
    verdict = "drift detected" if report.drifted else "no drift detected"
    alerts = ", ".join(f"{t.feature} ({t.test})" for t in report.alerts) or "none"
    return title, (
        f"Verdict: **{verdict}** at alpha {report.alpha} with Holm's correction over "
        f"{sum(p is not None for p in report.adjusted_p_values)} tests (PSI is read by its level: above "
        f"0.1 moderate, above 0.25 major). "
        f"Alerts: {alerts}."
    )


def drift_markdown(report: DriftReport, title: str, plots: dict[str, str]) -> str:
    """Markdown: the verdict, the table of tests, what was skipped, and the plots by path."""
    heading, verdict = _summary(report, title)
    lines = [f"# {heading}", "", verdict, ""]
    lines += [
        "| feature | test | statistic | p-value | Holm p | verdict | n (ref / cur) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['feature']} | {r['test']} | {r['statistic']} | {r['p']} | {r['holm']} | {r['verdict']} | {r['n']} |"
        for r in _rows(report)
    ]
    if report.skipped:
        lines += ["", "Not tested:", ""] + [f"- {name}: {why}" for name, why in report.skipped.items()]
    lines += ["", "## Distributions", ""]
    lines += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def drift_html(report: DriftReport, title: str, pngs: dict[str, bytes]) -> str:
    """A self-contained HTML page: the plots are embedded as data URIs."""
    heading, verdict = _summary(report, title)
    verdict = html.escape(verdict).replace("**", "")
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(r[k])}</td>" for k in ("feature", "test", "statistic", "p", "holm"))
        + f'<td class="{"drift" if r["verdict"].startswith("DRIFT") else "ok"}">{html.escape(r["verdict"])}</td>'
        + f"<td>{html.escape(r['n'])}</td></tr>"
        for r in _rows(report)
    )
    skipped = "".join(f"<li>{html.escape(n)}: {html.escape(w)}</li>" for n, w in report.skipped.items())
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>'
        for name, png in pngs.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(heading)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 72em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
td.drift {{ color: #b00; font-weight: bold; }} td.ok {{ color: #070; }}
figure {{ display: inline-block; margin: 0.5em; }}
</style></head><body>
<h1>{html.escape(heading)}</h1>
<p>{verdict}</p>
<table><tr><th>feature</th><th>test</th><th>statistic</th><th>p-value</th><th>Holm p</th><th>verdict</th>
<th>n (ref / cur)</th></tr>{rows}</table>
{f"<p>Not tested:</p><ul>{skipped}</ul>" if skipped else ""}
<h2>Distributions</h2>
{figures}
</body></html>
"""


def write_drift_report(report: DriftReport, out: str | Path, *, title: str = "Drift report") -> list[Path]:
    """Write ``out`` (.html: self-contained; .md: with PNGs in ``<stem>_files/`` beside it);
    returns the files written."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm", ".md"):
        raise ValueError(f"--out must end in .html or .md, got {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = {
        name: feature_plot_png(name, report.reference_features[name], report.current_features[name])
        for name in report.reference_features
    }
    if out.suffix.lower() == ".md":
        folder = out.with_name(f"{out.stem}_files")
        folder.mkdir(exist_ok=True)
        written, links = [], {}
        for name, png in pngs.items():
            path = folder / f"{name}.png"
            with atomic_path(path) as temporary:
                temporary.write_bytes(png)
            written.append(path)
            links[name] = f"{folder.name}/{path.name}"
        atomic_write_text(out, drift_markdown(report, title, links))
        return [out, *written]
    atomic_write_text(out, drift_html(report, title, pngs))
    return [out]
