"""The parity report as one self-contained HTML page: a table and an inline SVG bar chart per metric."""

from __future__ import annotations

import html
from typing import Any

from rsedge.parity.report import HEADLINE, describe_miss, reasoning_cell

COLOURS = ("#555555", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


# Shown beside a task's headline: grounding with reasoning is also read by mean IoU (a box that drifted but still
# hits) and by the share of answers in the trained think/answer shape (a recipe that breaks the format shows there).
SECONDARY = {"vgr": ("miou", "well_formed")}


def headline_metrics(row: dict[str, Any]) -> dict[str, float]:
    metrics = row["metrics"]
    pairs = [(t, m) for t, m in HEADLINE.items()] + [(t, m) for t, ms in SECONDARY.items() for m in ms]
    return {f"{t} {m}": float(metrics[t][m]) for t, m in pairs if t in metrics and m in metrics[t]}


def bar_chart(rows: list[dict[str, Any]], width: int = 900, bar: int = 10) -> str:
    names = sorted({k for r in rows for k in headline_metrics(r)})
    height = 30 + len(names) * (bar * len(rows) + 14)
    out = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="11">']
    y = 20
    for metric in names:
        out.append(f'<text x="0" y="{y + bar}">{html.escape(metric)}</text>')
        for i, r in enumerate(rows):
            v = headline_metrics(r).get(metric, 0.0)
            w = max(1, int(v * (width - 260)))
            out.append(f'<rect x="150" y="{y}" width="{w}" height="{bar - 1}" fill="{COLOURS[i % len(COLOURS)]}"/>')
            out.append(f'<text x="{155 + w}" y="{y + bar - 2}">{v:.3f}</text>')
            y += bar
        y += 14
    legend = " ".join(
        f'<tspan fill="{COLOURS[i % len(COLOURS)]}">■ {html.escape(r["label"])}</tspan>' for i, r in enumerate(rows)
    )
    out.append(f'<text x="150" y="12">{legend}</text></svg>')
    return "\n".join(out)


def targets_html(targets: list[dict[str, Any]]) -> str:
    if not targets:
        return "<p>No quantized bundle in this report.</p>"
    misses = [t for t in targets if not t["met"]]
    met = len(targets) - len(misses)
    items = "".join(f"<li>{html.escape(describe_miss(t))}</li>" for t in misses)
    return f"<p>{met} of {len(targets)} task metrics within target (INT8 ±0.5, INT4 ±1.5 points).</p><ul>{items}</ul>"


def render(report: dict[str, Any]) -> str:
    rows = report["rows"]
    metric_names = sorted({k for r in rows for k in headline_metrics(r)})
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metric_names)
    reasons = any("reasoning_tokens" in r for r in rows)  # the column only where answers had a think block
    think_head = "<th>think tok (x ref)</th>" if reasons else ""
    body = []
    for r in rows:
        hm = headline_metrics(r)
        cells = "".join(f"<td>{hm.get(m, float('nan')):.3f}</td>" for m in metric_names)
        if "size" in r:  # a bundle
            extra = (
                f"<td>{r['logits_cosine']:.5f}</td><td>{r['logits_sqnr_db']:.1f}</td>"
                f"<td>{r['greedy_token_agreement']:.3f}</td><td>{r['size']['decoder_mb']:.1f}</td>"
                f"<td>{r['prefill_ms_median']:.1f}</td><td>{(r['decode_ms_per_token_median'] or 0):.2f}</td>"
                f"<td>{r['peak_memory']['peak_rss_mb']:.0f}</td>"
            )
        elif "logits_cosine" in r:  # a bitsandbytes baseline in PyTorch
            extra = (
                f"<td>{r['logits_cosine']:.5f}</td><td>{r['logits_sqnr_db']:.1f}</td>"
                f"<td>{r['greedy_token_agreement']:.3f}</td><td>{r['decoder_linear_mb']:.1f}*</td>"
                f"<td>{r.get('prefill_ms_median', float('nan')):.1f}</td>"
                f"<td>{r['decode_ms_per_token']:.2f}</td><td>-</td>"
            )
        else:
            extra = (
                f"<td colspan=4>reference</td><td>{r.get('prefill_ms_median', float('nan')):.1f}</td>"
                f"<td>{r['decode_ms_per_token']:.2f}</td><td>-</td>"
            )
        think = f"<td>{html.escape(reasoning_cell(r))}</td>" if reasons else ""
        body.append(f"<tr><td>{html.escape(r['label'])}</td>{cells}{extra}{think}</tr>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>rsedge parity report</title>
<style>body{{font-family:sans-serif}} td,th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}}</style>
</head><body><h1>rsedge parity report</h1>
<p>{report["samples"]} samples ({html.escape(report["data"])}), seed {report["seed"]}.</p>
<table><tr><th>bundle</th>{head}<th>logits cos</th><th>logits SQNR dB</th><th>greedy agree</th>
<th>decoder MB</th><th>prefill ms</th><th>decode ms/tok</th><th>peak RSS MB</th>{think_head}</tr>
{"".join(body)}</table>
<p>* bitsandbytes rows: bytes of the quantized decoder linears only (PyTorch, no bundle).
Peak RSS: a fresh process with only the runtime answering the first sample (rsedge.bench.peak_memory).</p>
<h2>Fidelity targets</h2>{targets_html(report.get("targets", []))}
<h2>Task metrics</h2>{bar_chart(rows)}
</body></html>
"""
