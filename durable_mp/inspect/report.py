"""``durable-mp report``: one self-contained HTML file with a Gantt chart of an execution.

The page needs nothing but itself: inline CSS, an inline SVG chart and a few lines of
inline JavaScript (click a bar for its details).  No fonts, scripts or styles are
fetched, so it can be mailed, archived or opened offline.  Every bar is an SVG ``rect``
with ``class="bar"`` and ``data-*`` attributes (``data-op-id``, ``data-kind``,
``data-status``, ``data-name``, ``data-pid``, ...), so tools and tests can read the chart
back with any HTML parser.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os

from durable_mp.core.records import OpStatus
from durable_mp.inspect.history import iso
from durable_mp.inspect.runs import crash_facts
from durable_mp.inspect.timeline import DRIVER, NO_WORKER, STOPPED, Bar, Timeline, build_timeline
from durable_mp.inspect.tree import OpTree, error_line, error_type
from durable_mp.store.records import display_status

LABEL_W = 200  # px, row labels
PLOT_W = 1100  # px, the time axis
AXIS_H = 34  # px
LANE_H = 20  # px per lane of a row
ROW_PAD = 6  # px
MAX_FAILURE_ROWS = 200
MIN_MARK_W = 3.0  # px: a retried or failed attempt stays visible however short it was

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:20px;margin:0 0 12px} h1 code{font-size:18px} h2{font-size:16px;margin:24px 0 8px}
code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:13px;vertical-align:middle}
.st-SUCCEEDED{background:#2e9e44}.st-FAILED{background:#d1342f}.st-RUNNING{background:#b58100}.st-INTERRUPTED{background:#8a5a00}
table{border-collapse:collapse}
td,th{padding:3px 10px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
table.summary th{color:#57606a;font-weight:500}
.legend{margin:14px 0;display:flex;gap:16px;flex-wrap:wrap;font-size:13px;align-items:center}
.legend svg{vertical-align:middle}
.chart{overflow-x:auto;border:1px solid #d0d7de;border-radius:6px;padding:4px}
svg text{font:12px system-ui,sans-serif;fill:#1f2328}
svg .tick{stroke:#eaeef2} svg .tick-label{fill:#57606a;font-size:11px}
svg .row-bg{fill:#f6f8fa} svg .row-label{font-size:12px}
svg .run-line{stroke:#0969da;stroke-dasharray:4 3} svg .run-label{fill:#0969da;font-size:11px}
svg .gap{fill:#eaeef2;fill-opacity:.75;stroke:#8c959f;stroke-dasharray:2 2} svg .gap-label{fill:#57606a;font-size:11px}
.bar{cursor:pointer} .bar:hover,.bar.hl{stroke:#0969da!important;stroke-width:2px!important}
.branch{stroke-width:1px} .branch.succeeded{fill:#d3f0d9;stroke:#2e9e44}
.branch.failed{fill:#f9d3d1;stroke:#d1342f} .branch.started{fill:#eceff1;stroke:#8c959f;stroke-dasharray:3 2}
.branch.redispatched{stroke:#8250df;stroke-width:2px;stroke-dasharray:5 2}
.attempt.succeeded{fill:#2e9e44} .attempt.failed{fill:#d1342f} .attempt.retried{fill:#f08c00}
.attempt.started,.attempt.pending{fill:#8c959f}
.context{fill:#c9d6e3;stroke:#6e7781} .context.failed{fill:#f9d3d1;stroke:#d1342f} .context.started{fill:#eceff1}
.wait{fill:#e8e2f7;stroke:#8250df}
.crash-marker{fill:#d1342f;stroke:#fff;stroke-width:1px;cursor:pointer}
.stop-marker{fill:#6b7280;stroke:#fff;stroke-width:1px;cursor:pointer}
#details{margin-top:10px;font:12px ui-monospace,monospace;white-space:pre-wrap;background:#f6f8fa;
 border-radius:6px;padding:8px;min-height:1.5em}
.err{color:#b42318;font:12px ui-monospace,monospace;white-space:pre-wrap}
"""

_JS = """
(function(){
  var details=document.getElementById('details');
  document.querySelector('.chart svg').addEventListener('click',function(ev){
    var el=ev.target.closest('[data-op-id]'); if(!el){return;}
    document.querySelectorAll('.hl').forEach(function(x){x.classList.remove('hl');});
    document.querySelectorAll('[data-op-id="'+el.dataset.opId+'"]').forEach(function(x){x.classList.add('hl');});
    var lines=[];
    for(var k in el.dataset){ if(el.dataset[k]!==''){ lines.push(k+': '+el.dataset[k]); } }
    details.textContent=lines.join('\\n');
  });
})();
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _row_label(row: object) -> str:
    if row == DRIVER:
        return "driver"
    if row == NO_WORKER:
        return "no worker (pid unknown)"
    return f"worker pid {row}"


def _tick_step(span: float) -> float:
    raw = span / 10
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt_offset(seconds: float, step: float) -> str:
    if step >= 60:
        return f"+{seconds / 60:g}m"
    digits = max(0, -int(math.floor(math.log10(step)))) if step < 1 else 0
    return f"+{seconds:.{digits}f}s"


def _bar_svg(bar: Bar, x, y0: float) -> str:
    x1, x2 = x(bar.start), x(bar.end)
    w = max(x2 - x1, 1.0 if bar.status == "succeeded" else MIN_MARK_W)
    if bar.kind in ("branch", "context", "wait"):
        y, h = y0 + bar.lane * LANE_H + 2, LANE_H - 4
    else:
        y, h = y0 + bar.lane * LANE_H + 6, LANE_H - 12
    classes = ["bar", bar.kind, bar.status] + (["redispatched"] if bar.redispatched else [])
    dur = bar.end - bar.start
    attrs = {
        "data-op-id": bar.op_id, "data-kind": bar.kind, "data-status": bar.status, "data-name": bar.name,
        "data-pid": bar.row, "data-start": iso(bar.start), "data-end": iso(bar.end),
        "data-duration": f"{dur:.3f}s", "data-attempt": "" if bar.attempt is None else bar.attempt,
        "data-error": bar.error, "data-crash": bar.crash, "data-redispatched": "1" if bar.redispatched else "",
        "data-branch": bar.parent,
    }
    title = f"{bar.kind} {bar.name}"
    if bar.attempt is not None:
        title += f" attempt {bar.attempt}"
    title += f" — {bar.status}, {dur:.3f}s"
    if bar.redispatched:
        title += " (re-dispatched after its first worker stopped)"
    if bar.error:
        title += f"\n{bar.error}"
    attr_text = " ".join(f'{k}="{_e(v)}"' for k, v in attrs.items())
    return (f'<rect class="{" ".join(classes)}" x="{x1:.2f}" y="{y:.1f}" width="{w:.2f}" height="{h}" rx="2" '
            f'{attr_text}><title>{_e(title)}</title></rect>')


def _chart(tl: Timeline) -> str:
    span = tl.end - tl.start

    def x(ts: float) -> float:
        return LABEL_W + (ts - tl.start) / span * PLOT_W

    row_y: dict[object, float] = {}
    y = AXIS_H
    parts: list[str] = []
    for i, row in enumerate(tl.rows):
        h = tl.lanes[row] * LANE_H + ROW_PAD
        row_y[row] = y + ROW_PAD / 2
        if i % 2 == 0:
            parts.append(f'<rect class="row-bg" x="0" y="{y:.1f}" width="{LABEL_W + PLOT_W + 10}" height="{h}"/>')
        parts.append(f'<text class="row-label" x="8" y="{y + min(h, LANE_H + ROW_PAD) / 2 + 4:.1f}" '
                     f'data-row="{_e(row)}">{_e(_row_label(row))}</text>')
        y += h
    height = y + 8
    step = _tick_step(span)
    ticks = []
    n = 0
    while n * step <= span * 1.0001:
        tx = x(tl.start + n * step)
        ticks.append(f'<line class="tick" x1="{tx:.2f}" y1="{AXIS_H - 6}" x2="{tx:.2f}" y2="{height}"/>'
                     f'<text class="tick-label" x="{tx:.2f}" y="{AXIS_H - 12}" text-anchor="middle">'
                     f'{_e(_fmt_offset(n * step, step))}</text>')
        n += 1
    for g0, g1 in tl.gaps:  # no driver existed here: drawn as a gap, never as a bar running through
        gx0, gx1 = x(g0), x(g1)
        ticks.append(f'<rect class="gap" data-kind="gap" data-start="{_e(iso(g0))}" data-end="{_e(iso(g1))}" '
                     f'x="{gx0:.2f}" y="{AXIS_H - 4}" width="{max(gx1 - gx0, 1.0):.2f}" height="{height - AXIS_H + 4}">'
                     f'<title>{_e(f"no driver for {g1 - g0:.1f}s: it stopped; the execution waited for a resume")}'
                     f'</title></rect>'
                     f'<text class="gap-label" x="{(gx0 + gx1) / 2:.2f}" y="{(AXIS_H + height) / 2:.1f}" '
                     f'text-anchor="middle">'
                     f'no driver</text>')
    for run in tl.runs[1:]:
        if tl.start < run.start <= tl.end:
            rx = x(run.start)
            ticks.append(f'<line class="run-line" data-run="{run.number}" x1="{rx:.2f}" y1="{AXIS_H - 4}" '
                         f'x2="{rx:.2f}" y2="{height}"><title>run {run.number} (resumed) started here</title></line>'
                         f'<text class="run-label" x="{rx + 4:.2f}" y="{AXIS_H - 14}">run {run.number}</text>')
    bars = sorted(tl.bars, key=lambda b: (not b.container, b.start))  # containers first, leaves on top
    body = [_bar_svg(b, x, row_y[b.row]) for b in bars]
    marks = []
    for m in tl.markers:
        if m.row not in row_y:
            continue
        mx, my = x(m.ts), row_y[m.row]
        if m.kind == STOPPED:  # a square: no worker crashed here, the driver stopped
            shape, cls, title = f"M{mx - 5:.1f},{my - 1:.1f} h10 v10 h-10 Z", "stop-marker", "stopped: "
        else:
            shape = f"M{mx - 6:.1f},{my - 2:.1f} L{mx + 6:.1f},{my - 2:.1f} L{mx:.1f},{my + 9:.1f} Z"
            cls, title = "crash-marker", "crash: "
        marks.append(f'<path class="{cls}" data-op-id="{_e(m.op_id)}" data-kind="{_e(m.kind)}" '
                     f'data-pid="{_e(m.row)}" data-at="{_e(iso(m.ts))}" data-text="{_e(m.text)}" '
                     f'd="{shape}"><title>{_e(title + m.text)}</title></path>')
    width = LABEL_W + PLOT_W + 20
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
            f'viewBox="0 0 {width} {height:.0f}" role="img" aria-label="timeline">'
            + "".join(parts) + "".join(ticks) + "".join(body) + "".join(marks) + "</svg>")


def _legend() -> str:
    items = [("branch succeeded", "bar branch succeeded", 16), ("branch failed", "bar branch failed", 16),
             ("branch started / abandoned", "bar branch started", 16),
             ("branch re-dispatched", "bar branch succeeded redispatched", 16),
             ("attempt succeeded", "bar attempt succeeded", 8), ("attempt retried", "bar attempt retried", 8),
             ("attempt failed", "bar attempt failed", 8), ("batch (driver)", "bar context succeeded", 16),
             ("wait", "bar wait succeeded", 16)]
    out = []
    for label, cls, h in items:
        cls = cls.replace("bar ", "")
        out.append(f'<span><svg width="28" height="16"><rect class="{cls}" x="1" y="{(16 - h) / 2}" width="26" '
                   f'height="{h}" rx="2"/></svg> {label}</span>')
    out.append('<span><svg width="16" height="14"><path class="crash-marker" d="M2,1 L14,1 L8,12 Z"/></svg> '
               'worker crash / kill</span>')
    out.append('<span><svg width="16" height="14"><path class="stop-marker" d="M3,2 h10 v10 h-10 Z"/></svg> '
               'stopped driver (and its workers)</span>')
    out.append('<span><svg width="28" height="16"><rect class="gap" x="1" y="1" width="26" height="14"/></svg> '
               'no driver (between runs)</span>')
    return '<div class="legend">' + "".join(out) + "</div>"


def _summary_table(tl: Timeline, tree: OpTree) -> str:
    s = tl.summary
    ex = tree.execution
    done, total = tree.done_total()

    def counts(d: dict) -> str:
        return ", ".join(f"{v} {k}" for k, v in sorted(d.items())) or "0"

    rows = [
        ("handler", f"<code>{_e(s['handler'])}</code>"),
        ("status", _e(s["status"])),
        ("created", _e(_dt.datetime.fromtimestamp(ex.created_ts).strftime("%Y-%m-%d %H:%M:%S"))),
        ("duration", _e(f"{s['duration_s']:.3f} s" + ("" if ex.ended_ts else " (not finished)"))),
        ("operations", _e(f"{done} finished of {total} recorded")),
        ("worker processes", _e(s["workers"])),
        ("branches", _e(counts(s["branches"]))),
        ("steps", _e(counts(s["steps"]))),
        ("step attempts", _e(f"{s['attempts']} ({s['retries']} retried)")),
        ("worker crashes", _e(f"{s['crashes']} worker crash(es), {s['kills']} attempt(s) killed (timeout / memory); "
                              f"{s['redispatched']} branch(es) re-dispatched; "
                              f"{s['failed_branches']} branch(es) failed")),
        ("runs", _e(_runs_text(tl))),
    ]
    if tl.hidden:
        rows.append(("not drawn", _e(f"{tl.hidden} ordinary bars (showing every failure and a sample)")))
    body = "".join(f'<tr data-key="{_e(k)}"><th>{_e(k)}</th><td>{v}</td></tr>' for k, v in rows)
    data = _e(json.dumps(s, sort_keys=True))
    return f'<table class="summary" id="summary" data-summary="{data}">{body}</table>'


def _runs_text(tl: Timeline) -> str:
    s = tl.summary
    if len(tl.runs) <= 1:
        cut = bool(tl.runs) and not tl.runs[0].finished and not tl.runs[0].running
        return "1 (its driver stopped before the execution finished; resume it)" if cut else "1"
    gaps = ", ".join(f"{g:.1f} s" for g in s["gaps_s"]) or "none"
    stopped = sum(1 for r in tl.runs if not r.finished and not r.running)
    return (f"{len(tl.runs)} ({stopped} stopped before finishing; gaps without a driver: {gaps}); "
            f"{s['reran_after_resume']} branch(es) started before a resume re-ran after it, "
            f"{s['ran_in_resumed_runs']} finished in resumed runs")


def _crash_rows(tree: OpTree) -> str:
    """One row per worker death: which branch, which pid, what it cost."""
    facts = crash_facts(tree)
    rows = []
    for d in facts.deaths[:MAX_FAILURE_ROWS]:
        rec = tree.ops.get(d.op_id)
        then = "failed" if rec is not None and rec.status == OpStatus.FAILED and error_type(rec.error) == d.kind \
            else ("re-dispatched" if d.op_id in facts.redispatched else "")
        rows.append(f'<tr data-op-id="{_e(d.op_id)}" data-pid="{d.pid}"><td>{_e(d.name)}</td><td>{d.pid}</td>'
                    f'<td>{_e(then)}</td><td class="err">{_e(error_line(d.error, 500))}</td></tr>')
    if not rows:
        return ""
    return ('<h2>Worker crashes</h2><table id="crashes"><tr><th>branch / step</th><th>pid</th><th>then</th>'
            '<th>error</th></tr>' + "".join(rows) + "</table>")


def _failures(tree: OpTree) -> str:
    failed = [r for r in tree.ops.values() if r.status == OpStatus.FAILED]
    failed.sort(key=lambda r: r.start_ts)
    ex = tree.execution
    rows = []
    if ex.error:
        rows.append(f'<tr><td>execution</td><td>{_e(ex.exec_id)}</td><td class="err">'
                    f'{_e(error_line(ex.error, 2000))}</td></tr>')
    for rec in failed[:MAX_FAILURE_ROWS]:
        rows.append(f'<tr data-op-id="{_e(rec.op_id)}"><td>{_e(rec.sub_type)}</td><td>{_e(rec.name or "")}</td>'
                    f'<td class="err">{_e(error_line(rec.error, 2000))}</td></tr>')
    if len(failed) > MAX_FAILURE_ROWS:
        rows.append(f"<tr><td colspan=3>… {len(failed) - MAX_FAILURE_ROWS} more</td></tr>")
    if not rows:
        return "<p>No operation failed.</p>"
    return '<table id="failures"><tr><th>operation</th><th>name</th><th>error</th></tr>' + "".join(rows) + "</table>"


def render_report(tree: OpTree) -> str:
    """The whole HTML document for one execution."""
    tl = build_timeline(tree)
    ex = tree.execution
    status = display_status(ex)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>durable_mp report: {_e(ex.exec_id)}</title><style>{_CSS}</style></head><body>"
        f'<h1>Execution <code>{_e(ex.exec_id)}</code> <span class="badge st-{status}">{_e(status)}</span></h1>'
        + _summary_table(tl, tree)
        + "<h2>Timeline</h2>" + _legend()
        + f'<div class="chart">{_chart(tl)}</div>'
        + '<div id="details">Click a bar for its details.</div>'
        + "<h2>Failures</h2>" + _failures(tree) + _crash_rows(tree)
        + f"<script>{_JS}</script></body></html>\n"
    )


def write_report(tree: OpTree, path: str | os.PathLike) -> str:
    """Write the report to ``path`` (atomically) and return the path written."""
    text = render_report(tree)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
