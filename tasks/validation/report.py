"""A self-contained HTML view of ``validation.json`` that opens offline: ``validation.html`` beside it.

GX Data Docs load their scripts, styles and icons from CDNs, so offline they render unstyled and
their index never links to the results. This page has inline CSS and no script or external asset:
every problem found (with line numbers, as validation names them), then every expectation of every
suite with its status, what it expected and what it observed, then the drift numbers.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from tasks import artifacts, storage
from tasks.validation.expectations import expected_text

REPORT_NAME = artifacts.VALIDATION_HTML
MAX_VALUE_CHARS = 300

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#1d2733;max-width:1200px}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
table{border-collapse:collapse;width:100%;font-size:.88em;margin:.5em 0}
th,td{border:1px solid #d0d7de;padding:.35em .5em;text-align:left;vertical-align:top}
th{background:#f3f5f7} code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.95em}
.badge{display:inline-block;padding:.1em .55em;border-radius:1em;font-weight:600;font-size:.85em}
.pass{background:#dafbe1;color:#116329} .fail{background:#ffebe9;color:#a40e26}
tr.failed td{background:#fff8f7} ul.problems li{margin:.3em 0} .muted{color:#57606a}
"""


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + " ..."


def _badge(ok: bool) -> str:
    return f'<span class="badge {"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span>'


def observed_text(result: dict[str, Any]) -> str:
    r = result.get("result") or {}
    exc = result.get("exception_info") or {}
    if exc.get("raised_exception"):
        return f"GX error: {exc.get('exception_message')}"
    if r.get("unexpected_count"):
        examples = r.get("partial_unexpected_list") or []
        rows = r.get("partial_unexpected_index_list") or []
        text = f"{r['unexpected_count']} of {r.get('element_count')} rows unexpected"
        if examples:
            text += f"; e.g. values {_short(examples)}"
        if rows:
            text += f" at data rows {_short(rows)}"
        return text
    if "observed_value" in r:
        value = r["observed_value"]
        if isinstance(value, list) and len(value) > 6:  # a column list: its length and ends say enough
            return f"{len(value)} items: {', '.join(map(str, value[:2]))}, ..., {value[-1]}"
        return _short(value)
    if "element_count" in r:
        return f"{r.get('unexpected_count', 0)} of {r['element_count']} rows unexpected"
    return ""


def _where(failures: list[str], suite: str, what: str) -> list[str]:
    """The validation messages (which name lines and columns) that belong to one expectation."""
    return [f for f in failures if f.startswith(f"{suite}:") and f.endswith(f"[{what}]")]


def render_validation_html(report: dict[str, Any]) -> str:
    """The page for one ``validation.json`` document."""
    esc = html.escape
    failures = [str(f) for f in report.get("failures", [])]
    passed = bool(report.get("passed"))
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Validation of {esc(str(report.get('dataset')))}: {'passed' if passed else 'FAILED'}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Validation of <code>{esc(str(report.get('dataset')))}</code> {_badge(passed)}</h1>",
    ]
    if report.get("served_from_cache"):
        out.append(f'<p class="muted">Served from cache: the bytes were validated by the run of '
                   f"<code>{esc(str(report['served_from_cache']))}</code>.</p>")
    out.append(f"<h2>Problems found ({len(failures)})</h2>")
    if failures:
        out.append('<ul class="problems">' + "".join(f'<li class="mono">{esc(f)}</li>' for f in failures) + "</ul>")
    else:
        out.append("<p>None: every check passed.</p>")
    matched: set[str] = set()
    for suite_result in report.get("great_expectations", []):
        suite = str(suite_result.get("suite_name") or suite_result.get("meta", {}).get("expectation_suite_name"))
        stats = suite_result.get("statistics", {})
        out.append(f"<h2>{esc(suite)} {_badge(bool(suite_result.get('success')))} "
                   f'<span class="muted">{stats.get("successful_expectations", "?")} of '
                   f'{stats.get("evaluated_expectations", "?")} expectations met</span></h2>')
        out.append("<table><tr><th>status</th><th>check</th><th>expectation</th><th>expected</th>"
                   "<th>observed</th><th>where (lines, columns)</th></tr>")
        for res in suite_result.get("results", []):
            cfg = res.get("expectation_config", {})
            kwargs = cfg.get("kwargs", {})
            column = kwargs.get("column")
            what = f"{cfg.get('type')}({column})" if column else str(cfg.get("type"))
            where = _where(failures, suite, what)
            matched.update(where)
            ok = bool(res.get("success"))
            out.append(f'<tr class="{"" if ok else "failed"}"><td>{_badge(ok)}</td>'
                       f"<td>{esc(str((cfg.get('meta') or {}).get('check', '')))}</td>"
                       f'<td class="mono">{esc(what)}</td><td>{esc(expected_text(kwargs))}</td>'
                       f'<td class="mono">{esc(observed_text(res))}</td>'
                       f'<td class="mono">{"<br>".join(esc(w) for w in where)}</td></tr>')
        out.append("</table>")
    drift = report.get("drift") or {}
    if drift:
        out.append("<h2>Drift numbers</h2><table><tr><th>split</th><th>statistic</th><th>value</th></tr>")
        for split, values in drift.items():
            items = values.items() if isinstance(values, dict) else [("", values)]
            for name, value in items:
                shown = f"{value:.6g}" if isinstance(value, float) else _short(value)
                out.append(f"<tr><td>{esc(str(split))}</td><td>{esc(str(name))}</td>"
                           f'<td class="mono">{esc(shown)}</td></tr>')
        out.append("</table>")
    if report.get("data_docs"):
        out.append(f'<p class="muted">GX Data Docs (need internet for their styles): '
                   f"<code>{esc(str(report['data_docs']))}</code></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_validation_html(report: dict[str, Any], folder: Path) -> Path:
    """Render a validation report (what ``validation.json`` holds) to ``validation.html`` in ``folder``, atomically."""
    return storage.write_text(folder / REPORT_NAME, render_validation_html(report))
