"""Self-contained HTML reports for ``explain`` and ``audit``: styles, scripts and images inline,
nothing fetched from the network. Each example is shown in its own modality: an image (inline
PNG), a text, or a table row with feature names."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:0}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
th.sortable{cursor:pointer;text-decoration:underline}
.card{border:1px solid #bbb;border-radius:6px;padding:1em;margin:1.5em 0}
.examples{display:flex;flex-wrap:wrap;gap:10px}
.example{border:1px solid #ddd;border-radius:4px;padding:6px;width:250px;font-size:.85em}
.helpful .example{border-color:#2a7}.harmful .example{border-color:#c33}
.text{white-space:pre-wrap;max-height:8em;overflow:auto;font-family:monospace}
img.pixel{image-rendering:pixelated;width:96px}
.note{color:#555;font-size:.9em}
"""

SORT_SCRIPT = """
document.querySelectorAll('th.sortable').forEach(function (header) {
  header.addEventListener('click', function () {
    var table = header.closest('table');
    var body = table.tBodies[0];
    var column = header.cellIndex;
    var descending = header.getAttribute('data-order') !== 'desc';
    header.setAttribute('data-order', descending ? 'desc' : 'asc');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = parseFloat(a.cells[column].getAttribute('data-value'));
      var y = parseFloat(b.cells[column].getAttribute('data-value'));
      return descending ? y - x : x - y;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def _escape(value: Any) -> str:
    return html.escape(str(value))


def _png(image: np.ndarray) -> str:
    from PIL import Image

    pixels = np.clip(np.asarray(image) * 255.0, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def example_html(examples: Any, index: int, features: list | None = None) -> str:
    """One example in its modality: an image, its text, or its feature values."""
    if examples.modality == "image" and examples.images is not None:
        return f'<img class="pixel" alt="example {index}" src="{_png(examples.images[index])}">'
    if examples.modality == "text":
        return f'<div class="text">{_escape(examples.inputs[index])}</div>'
    row = np.asarray(examples.inputs[index]).reshape(-1)
    names = examples.feature_names or [f"x{k}" for k in range(len(row))]
    pushed = {name: value for name, value in (features or [])}
    cells = "".join(
        f"<tr><td>{_escape(name)}</td><td>{value:.4g}</td>"
        f"<td>{'' if name not in pushed else f'{pushed[name]:+.2e}'}</td></tr>"
        for name, value in list(zip(names, row.tolist(), strict=False))[:12])
    more = f"<div class='note'>{len(row) - 12} more features</div>" if len(row) > 12 else ""
    header = ("<tr><th>feature</th><th>value</th><th title='change of the test loss per unit "
              "increase of this feature of this training point, I_pert/n'>push</th></tr>")
    return f"<table>{header}{cells}</table>{more}"


def svg_histogram(histogram: dict, label: str, width: int = 360, height: int = 120) -> str:
    """Bars of ``histogram["counts"]`` between ``low`` and ``high``."""
    counts = histogram["counts"]
    top = max(max(counts), 1)
    bar = width / len(counts)
    bars = "".join(
        f'<rect x="{k * bar:.1f}" y="{height - 20 - (height - 30) * c / top:.1f}" '
        f'width="{max(bar - 1, 1):.1f}" height="{(height - 30) * c / top:.1f}" fill="#579"/>'
        for k, c in enumerate(counts))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="{_escape(label)}">'
            f'{bars}<text x="0" y="{height - 4}" font-size="11">{histogram["low"]:.2e}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">'
            f'{histogram["high"]:.2e}</text></svg><div class="note">{_escape(label)}</div>')


def svg_scatter(predicted: np.ndarray, actual: np.ndarray, size: int = 320) -> str:
    """Predicted against actual changes, with the diagonal."""
    p, a = np.asarray(predicted).ravel(), np.asarray(actual).ravel()
    low = float(min(p.min(), a.min()))
    high = float(max(p.max(), a.max()))
    span = high - low if high > low else 1.0

    def at(value: float, flip: bool) -> float:
        unit = (value - low) / span
        return 20 + (size - 40) * ((1 - unit) if flip else unit)

    dots = "".join(f'<circle cx="{at(x, False):.1f}" cy="{at(y, True):.1f}" r="3" '
                   f'fill="#c63" fill-opacity="0.7"/>' for x, y in zip(p, a, strict=True))
    diagonal = (f'<line x1="{at(low, False)}" y1="{at(low, True)}" x2="{at(high, False)}" '
                f'y2="{at(high, True)}" stroke="#999"/>')
    return (f'<svg width="{size}" height="{size}" role="img" aria-label="predicted against '
            f'actual leave-one-out change">{diagonal}{dots}<text x="{size / 2}" y="{size - 2}" '
            f'font-size="11" text-anchor="middle">predicted change</text><text x="10" y="12" '
            f'font-size="11">actual change</text></svg>')


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_escape(title)}</title><style>{STYLE}</style></head><body>{body}"
            f"<script>{SORT_SCRIPT}</script></body></html>")


def _solver_section(summary: dict) -> str:
    items = "".join(f"<li>{_escape(line)}</li>" for line in summary["solver_report"])
    return (f"<h2>How the scores were computed</h2><p>Solver: <b>{_escape(summary['solver'])}"
            f"</b> — {_escape(summary['solver_reason'])}.</p><ul>{items}</ul>")


def _training_examples(subject: Any, entries: list[dict], kind: str) -> str:
    cards = "".join(
        f"<div class='example'>{example_html(subject.train_examples, e['index'], e['features'])}"
        f"<div>training point {e['index']}: label <b>{_escape(e['label'])}</b>, predicted "
        f"{_escape(e['predicted'])}</div><div>loo_change {e['loo_change']:+.3e}</div></div>"
        for e in entries)
    return f"<div class='examples {kind}'>{cards}</div>"


def explain_page(summary: dict, subject: Any) -> str:
    """The explain report: an index of test points (sortable by loss) and one card each."""
    points = summary["points"]
    index_rows = "".join(
        f"<tr><td data-value='{p['index']}'><a href='#test-{p['index']}'>{p['index']}</a></td>"
        f"<td>{_escape(p['label'])}</td><td>{_escape(p['predicted'])}</td>"
        f"<td data-value='{p['loss']:.17g}'>{p['loss']:.4g}</td></tr>" for p in points)
    index = (f"<table id='index'><thead><tr><th class='sortable'>test point</th><th>label</th>"
             f"<th>predicted</th><th class='sortable'>test loss</th></tr></thead>"
             f"<tbody>{index_rows}</tbody></table>")
    cards = []
    for p in points:
        cards.append(
            f"<div class='card' id='test-{p['index']}' data-test='{p['index']}'>"
            f"<h2>Test point {p['index']}: label {_escape(p['label'])}, predicted "
            f"{_escape(p['predicted'])}, test loss {p['loss']:.4g}</h2>"
            f"{example_html(subject.test_examples, p['index'])}"
            f"<h3>Most helpful training points</h3>"
            f"{_training_examples(subject, p['helpful'], 'helpful')}"
            f"<h3>Most harmful training points</h3>"
            f"{_training_examples(subject, p['harmful'], 'harmful')}"
            f"<h3>All training points</h3>"
            f"{svg_histogram(p['histogram'], 'distribution of loo_change over the training set')}"
            f"</div>")
    check = ""
    if "check" in summary:
        c = summary["check"]
        check = (f"<h2>Check against retraining</h2><p>{len(c['removed'])} training points "
                 f"removed one at a time and the model refitted: Pearson R between predicted and "
                 f"actual change of the test loss = <b>{c['pearson']:.3f}</b>.</p>"
                 f"{svg_scatter(np.array(c['predicted']), np.array(c['actual']))}")
    notes = "".join(f"<li>{_escape(note)}</li>" for note in summary.get("notes", []))
    body = (f"<h1>influencekit: which training points made the model do this?</h1>"
            f"<p>{summary['num_train']} training points, {summary['num_test']} test points; "
            f"explained: {_escape(summary['test_points'])}. loo_change: "
            f"{_escape(summary['loo_change'])}.</p>{index}{_solver_section(summary)}{check}"
            f"{''.join(cards)}" + (f"<ul class='note'>{notes}</ul>" if notes else ""))
    return _page("influencekit explain", body)


def audit_page(summary: dict, subject: Any) -> str:
    """The audit report: training points by self-influence, most negative first."""
    rows = "".join(
        f"<tr><td data-value='{r['index']}'>{r['index']}</td><td>{_escape(r['label'])}</td>"
        f"<td>{_escape(r['predicted'])}</td>"
        f"<td data-value='{r['self_influence']:.17g}'>{r['self_influence']:.4g}</td>"
        f"<td data-value='{r['loss']:.17g}'>{r['loss']:.4g}</td></tr>" for r in summary["ranked"])
    table = (f"<table id='index'><thead><tr><th class='sortable'>training point</th>"
             f"<th>label</th><th>predicted</th><th class='sortable'>self-influence</th>"
             f"<th class='sortable'>training loss</th></tr></thead><tbody>{rows}</tbody></table>")
    cards = "".join(
        f"<div class='card' id='train-{r['index']}' data-train='{r['index']}'>"
        f"<h2>Training point {r['index']}: label {_escape(r['label'])}, predicted "
        f"{_escape(r['predicted'])}</h2>{example_html(subject.train_examples, r['index'])}"
        f"<p>self-influence {r['self_influence']:.4g}, training loss {r['loss']:.4g}</p></div>"
        for r in summary["ranked"])
    body = (f"<h1>influencekit audit: training points to check first</h1>"
            f"<p>{summary['num_train']} training points ranked by "
            f"{_escape(summary['self_influence'])}.</p>{table}"
            f"{svg_histogram(summary['histogram'], 'distribution of self-influence')}"
            f"{_solver_section(summary)}{cards}")
    return _page("influencekit audit", body)
