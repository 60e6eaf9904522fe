"""A drift run's causes for people: a rich table for the terminal, a self-contained HTML
section (thumbnails inline as data URIs, no script) for the report file."""

from __future__ import annotations

from html import escape

from rich.console import Group
from rich.table import Table
from rich.text import Text

from cvops.monitor.causes import CauseReport


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def cause_tables(report: CauseReport, rows: int = 11) -> Group:
    """The sentence, the ranked property tests and the prediction shift."""
    props = Table(title="Image properties (ranked)", title_justify="left")
    for column in ("rank", "property", "change", "KS distance", "p (adjusted)", "verdict"):
        props.add_column(column, justify="left" if column in ("property", "verdict") else "right")
    for i, p in enumerate(report.properties[:rows], 1):
        verdict = "drifted" if p.significant else "ok"
        if p.explained_by:
            verdict += f" (follows {p.explained_by})"
        props.add_row(
            str(i),
            p.name,
            p.effect.removeprefix(p.name).strip(),
            f"{p.statistic:.3f}",
            _p(p.p_adjusted),
            Text(verdict, style="bold red" if p.significant else "green"),
        )
    parts: list[Table | Text] = [Text(f"Likely cause: {report.sentence}", style="bold")]
    if report.properties:
        parts.append(props)
    shift = report.prediction
    if shift is not None:
        title = (
            f"Predicted classes vs reference {shift.basis}: chi2 {shift.statistic:.1f}, "
            f"p (adjusted) {_p(shift.p_adjusted)}" + (" - shifted" if shift.significant else "")
        )
        table = Table(title=title, title_justify="left")
        for column in ("class", "reference", "window", "change"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for c in shift.classes[:6]:
            table.add_row(c.name, f"{c.reference:.1%}", f"{c.window:.1%}", f"{c.change:+.1%}")
        if shift.window_confidence is not None and shift.reference_confidence is not None:
            table.caption = (
                f"mean confidence {shift.reference_confidence:.2f} -> "
                f"{shift.window_confidence:.2f}, entropy {shift.reference_entropy:.2f} -> "
                f"{shift.window_entropy:.2f}"
            )
        parts.append(table)
    if report.examples:
        parts.append(
            Text(
                "Least like the reference: "
                + ", ".join(
                    f"{e.prediction_id[:8]} ({e.predicted_class}, {e.score:.1f})"
                    for e in report.examples
                )
            )
        )
    parts += [Text(f"note: {n}", style="yellow") for n in report.notes]
    return Group(*parts)


_STYLE = """
<style>
.cvops-causes{font-family:sans-serif;margin:16px;max-width:1100px}
.cvops-causes table{border-collapse:collapse;margin:8px 0 16px}
.cvops-causes td,.cvops-causes th{border:1px solid #ccc;padding:3px 8px;text-align:right}
.cvops-causes td:first-child,.cvops-causes th:first-child{text-align:left}
.cvops-causes .drift{color:#b00;font-weight:bold}
.cvops-causes figure{display:inline-block;margin:4px;text-align:center;font-size:12px}
.cvops-causes img{display:block;margin:2px auto;image-rendering:pixelated}
</style>
"""


def cause_html(report: CauseReport) -> str:
    """Self-contained HTML section: sentence, tables, example images with overlays."""
    out = [_STYLE, '<section class="cvops-causes">', "<h3>Why did it drift?</h3>"]
    out.append(f"<p><b>Likely cause:</b> {escape(report.sentence)}</p>")
    if report.properties:
        out.append(
            "<table><tr><th>property</th><th>change</th><th>KS distance</th>"
            "<th>p (adjusted)</th><th>verdict</th></tr>"
        )
        for p in report.properties:
            verdict = "drifted" if p.significant else "ok"
            if p.explained_by:
                verdict += f" (follows {p.explained_by})"
            css = ' class="drift"' if p.significant else ""
            out.append(
                f"<tr><td>{escape(p.name)}</td><td>"
                f"{escape(p.effect.removeprefix(p.name).strip())}</td>"
                f"<td>{p.statistic:.3f}</td><td>{_p(p.p_adjusted)}</td>"
                f"<td{css}>{escape(verdict)}</td></tr>"
            )
        out.append("</table>")
    shift = report.prediction
    if shift is not None:
        out.append(
            f"<p>Predicted classes against the reference {escape(shift.basis)}: chi-square "
            f"{shift.statistic:.1f}, p (adjusted) {_p(shift.p_adjusted)}"
            f"{' - <span class=drift>shifted</span>' if shift.significant else ''}</p>"
        )
        out.append("<table><tr><th>class</th><th>reference</th><th>window</th></tr>")
        for c in shift.classes:
            out.append(
                f"<tr><td>{escape(c.name)}</td><td>{c.reference:.1%}</td>"
                f"<td>{c.window:.1%}</td></tr>"
            )
        out.append("</table>")
        if shift.window_confidence is not None and shift.reference_confidence is not None:
            out.append(
                f"<p>Mean confidence {shift.reference_confidence:.2f} &rarr; "
                f"{shift.window_confidence:.2f}; entropy {shift.reference_entropy:.2f} &rarr; "
                f"{shift.window_entropy:.2f}</p>"
            )
    if report.examples:
        out.append("<h4>Window images least like the reference (domain classifier)</h4><div>")
        for e in report.examples:
            pictures = "".join(
                f'<img src="{uri}" alt="{escape(kind)}">'
                for kind, uri in (("upload", e.image), ("Grad-CAM", e.overlay))
                if uri
            )
            out.append(
                f"<figure>{pictures or '<i>image not stored</i>'}<figcaption>"
                f"{escape(str(e.predicted_class))} &middot; score {e.score:.1f}<br>"
                f"{escape(e.prediction_id[:8])}</figcaption></figure>"
            )
        out.append("</div>")
    out += [f"<p><i>Note: {escape(n)}</i></p>" for n in report.notes]
    out.append("</section>")
    return "\n".join(out)
