"""report.html: one self-contained page (inline CSS, plots as base64 PNG, no network) from report.json."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # headless: no display on build machines
import matplotlib.pyplot as plt  # noqa: E402

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3} .pass{color:#0a7d28;font-weight:600} .fail{color:#b00020;font-weight:600}
.skip{color:#777} .est{font-style:italic;color:#555} .muted{color:#666} img{max-width:100%}
"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def latency_plot(checks: list[dict]) -> str | None:
    """Decode tok/s per device, one bar per target; estimated bars hatched."""
    rows = [c for c in checks if c.get("metric") == "decode_tok_s" and c.get("value") is not None]
    if not rows:
        return None
    devices = sorted({c["device"] for c in rows})
    targets = sorted({c["target"] for c in rows})
    width = 0.8 / len(targets)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for i, target in enumerate(targets):
        for j, device in enumerate(devices):
            hit = [c for c in rows if c["target"] == target and c["device"] == device]
            if not hit:
                continue
            c = hit[0]
            estimated = c.get("source") == "estimated"
            ax.bar(j + i * width, c["value"], width, color=f"C{i}", hatch="//" if estimated else None,
                   edgecolor="white" if not estimated else "black", label=target if j == 0 else None)
    ax.set_xticks([j + width * (len(targets) - 1) / 2 for j in range(len(devices))], devices, rotation=20)
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode speed per device and target (hatched: estimated, solid: measured)")
    ax.legend(fontsize=8)
    return _png(fig)


def size_perplexity_plot(schemes: list[dict]) -> str | None:
    rows = [s for s in schemes if s.get("bytes") and s.get("perplexity")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for s in rows:
        ax.scatter(s["bytes"] / 2**20, s["perplexity"], color="C3" if s.get("chosen") else "C0")
        ax.annotate(s["scheme"], (s["bytes"] / 2**20, s["perplexity"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("weights (MiB)")
    ax.set_ylabel("Brown test perplexity")
    ax.set_title("Size against perplexity per scheme")
    return _png(fig)


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 else f"{v:,.{digits}f}".rstrip("0").rstrip(".")
    return html.escape(str(v))


def _status(ok) -> str:
    if ok is None:
        return '<span class="skip">skipped</span>'
    return '<span class="pass">pass</span>' if ok else '<span class="fail">FAIL</span>'


def render_html(report: dict) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>edgeslm report: {e(report['model_name'])}"
             f"</title><style>{CSS}</style></head><body>"]
    parts.append(f"<h1>edgeslm deploy: {e(report['model_name'])}</h1>")
    parts.append(f"<p class='muted'>scheme <b>{e(report['scheme'])}</b> · {report['parameters'] / 1e6:.1f}M parameters"
                 f" · {e(report['created'])} · overall {_status(report['ok'])}</p>")

    parts.append("<h2>Targets</h2><table><tr><th>target</th><th>status</th><th>size</th><th>bytes/param</th>"
                 "<th>greedy tokens agreeing</th><th>max |Δlogit|</th><th>perplexity (artifact / reference)</th>"
                 "<th>runtime</th></tr>")
    for t in report["targets"]:
        p = t.get("parity") or {}
        ppl = p.get("ppl_artifact"), p.get("ppl_reference")
        parts.append(
            f"<tr><td>{e(t['target'])}</td><td>{_status(t.get('ok'))}"
            + (f" <span class='muted'>{e(t['reason'])}</span>" if t.get("reason") else "")
            + f"</td><td>{_fmt((t.get('bytes') or 0) / 2**20)} MiB</td><td>{_fmt(t.get('bytes_per_param'))}</td>"
            f"<td>{_fmt(p.get('greedy_agree'))} of {_fmt(p.get('steps'))}</td><td>{_fmt(p.get('max_abs_logit_diff'))}</td>"
            f"<td>{_fmt(ppl[0])} / {_fmt(ppl[1])}</td><td>{e(str(p.get('runtime', '')))}</td></tr>")
    parts.append("</table>")

    if report.get("checks"):
        parts.append("<h2>Latency per device</h2><table><tr><th>target</th><th>device</th><th>figure</th>"
                     "<th>value</th><th>budget</th><th>result</th><th>source</th></tr>")
        for c in report["checks"]:
            cls = " class='est'" if c.get("source") == "estimated" else ""
            parts.append(f"<tr{cls}><td>{e(c['target'])}</td><td>{e(c['device'])}</td><td>{e(c['metric'])}</td>"
                         f"<td>{_fmt(c.get('value'))}{' (p90 ' + _fmt(c['spread']) + ')' if c.get('spread') else ''}</td>"
                         f"<td>{_fmt(c.get('budget'))}</td><td>{_status(c.get('ok'))}</td>"
                         f"<td>{e(str(c.get('runner') or c.get('source', '')))}</td></tr>")
        parts.append("</table>")
    plot = latency_plot(report.get("checks") or [])
    if plot:
        parts.append(f"<img alt='latency per device and target' src='{plot}'>")

    plot = size_perplexity_plot(report.get("schemes") or [])
    parts.append("<h2>Size against perplexity</h2>")
    if plot:
        parts.append(f"<img alt='size against perplexity per scheme' src='{plot}'>")
    else:
        parts.append("<p class='muted'>no scheme figures</p>")

    if report.get("not_available"):
        parts.append("<h2>Not built on this machine</h2><ul>")
        parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in report["not_available"].items()]
        parts.append("</ul>")

    parts.append("<h2>Tool versions</h2><table>")
    parts += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in sorted(report.get("tools", {}).items())]
    parts.append("</table></body></html>")
    return "".join(parts)
