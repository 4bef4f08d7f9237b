"""report.html: one self-contained page (inline CSS, plots as base64 PNG, no network) from report.json."""

from __future__ import annotations

import base64
import io

import jinja2
import markupsafe

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
    """Weights against perplexity, one marker per scheme; the names go in a legend, not beside the
    points, so that close points never print over each other's labels."""
    rows = [s for s in schemes if s.get("bytes") and s.get("perplexity")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    markers = "osD^vP*Xh<>"
    for i, s in enumerate(rows):
        ax.scatter(s["bytes"] / 2**20, s["perplexity"], s=60 if s.get("chosen") else 40, marker=markers[i % len(markers)],
                   color="C3" if s.get("chosen") else f"C{(i % 9) + (i % 9 >= 3)}",
                   label=s["scheme"] + (" (chosen)" if s.get("chosen") else ""))
    ax.set_xlabel("weights (MiB)")
    ax.set_ylabel("Brown test perplexity")
    ax.set_title("Size against perplexity per scheme")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    return _png(fig)


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-2 else f"{v:,.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


VERDICT_CLASS = {"pass": "pass", "fail": "fail", "unverified": "est", "reported": "skip"}


def _status(verdict: str):
    """One of latency.VERDICTS as a coloured word."""
    return markupsafe.Markup('<span class="{}">{}</span>').format(VERDICT_CLASS[verdict], verdict.upper())


PAGE = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>edgeslm report: {{ r.model_name }}</title><style>{{ css }}</style></head><body>
<h1>edgeslm deploy: {{ r.model_name }}</h1>
<p class="muted">scheme <b>{{ r.scheme }}</b> · {{ "%.1f"|format(r.parameters / 1e6) }}M parameters · {{ r.created }}
 · overall {{ status("pass" if r.ok else "fail") }}</p>
<p>Budget checks: {{ status("pass") }} {{ v.pass or 0 }} measured within budget · {{ status("fail") }} {{ v.fail or 0 }}
 · {{ status("unverified") }} {{ v.unverified or 0 }} estimated within budget, not measured
 · {{ status("reported") }} {{ v.reported or 0 }} without a budget
 {%- if r.allow_estimates %} (estimates accepted by allow_estimates){% endif %}</p>
<h2>Targets</h2>
<table><tr><th>target</th><th>status</th><th>size</th><th>bytes/param</th><th>greedy tokens agreeing</th>
<th>max |Δlogit|</th><th>perplexity (artifact / reference)</th><th>runtime</th></tr>
{% for t in r.targets %}{% set p = t.parity or {} %}
<tr><td>{{ t.target }}</td><td>{{ status(t.verdict) }}{% if t.reason %} <span class="muted">{{ t.reason }}</span>{% endif %}</td>
<td>{{ fmt((t.bytes or 0) / 1048576) }} MiB</td><td>{{ fmt(t.bytes_per_param) }}</td>
<td>{{ fmt(p.greedy_agree) }} of {{ fmt(p.steps) }}</td><td>{{ fmt(p.max_abs_logit_diff) }}</td>
<td>{{ fmt(p.ppl_artifact) }} / {{ fmt(p.ppl_reference) }}</td><td>{{ p.runtime or "" }}</td></tr>
{% endfor %}</table>
{% if r.checks %}<h2>Latency per device</h2>
<table><tr><th>target</th><th>device</th><th>figure</th><th>value</th><th>budget</th><th>result</th><th>source</th></tr>
{% for c in r.checks %}<tr{% if c.source == "estimated" %} class="est"{% endif %}><td>{{ c.target }}</td><td>{{ c.device }}</td>
<td>{{ c.metric }}</td><td>{{ fmt(c.value) }}{% if c.spread %} (p90 {{ fmt(c.spread) }}){% endif %}</td>
<td>{{ fmt(c.budget) }}</td><td>{{ status(c.verdict) }}</td><td>{{ c.runner or c.source }}</td></tr>
{% endfor %}</table>{% endif %}
{% if latency_png %}<img alt="latency per device and target" src="{{ latency_png }}">{% endif %}
<h2>Size against perplexity</h2>
{% if size_png %}<img alt="size against perplexity per scheme" src="{{ size_png }}">{% else %}<p class="muted">no scheme figures</p>{% endif %}
{% if r.not_available %}<h2>Not built on this machine</h2><ul>
{% for name, why in r.not_available.items() %}<li><b>{{ name }}</b>: {{ why }}</li>{% endfor %}</ul>{% endif %}
<h2>Tool versions</h2><table>
{% for name, version in (r.tools or {})|dictsort %}<tr><td>{{ name }}</td><td>{{ version }}</td></tr>{% endfor %}
</table></body></html>
""")


def render_html(report: dict) -> str:
    """The page, from report.json's dict (autoescaped: model names and reasons are user text)."""
    return PAGE.render(r=report, v=report.get("verdicts") or {}, css=markupsafe.Markup(CSS), status=_status, fmt=_fmt,
                       latency_png=latency_plot(report.get("checks") or []),
                       size_png=size_perplexity_plot(report.get("schemes") or []))
