"""Offline HTML reports of runs and the status page ``reports/index.html``.

Reports are rendered with nbconvert from the executed notebook using the
``offline`` template (``templates/offline``): no script, stylesheet or import
is loaded from the network, and figures are embedded as base64 PNGs, so a
report opens on a cluster node or from an e-mail attachment.

The status page has one row per experiment and profile: the latest run, its
status, date, commit, its claims with their intervals (``<b>_beats_<a>`` flags
and their ``..._diff_<b>_vs_<a>`` differences, :func:`seglab.evaluate.claims.find_claims`),
headline numbers from its ``summary.json`` and a link to its report. Every output listed in the manifest is checked against its
sha256: a file that is gone is flagged MISSING, one whose content differs
CHANGED (the seed project lost two experiments' outputs without noticing).
"""

from __future__ import annotations

import html
import os
import re
import shutil
from pathlib import Path

from seglab.core import io
from seglab.evaluate import claims
from seglab.core import paths
from seglab.workflow.chain import load_experiments
from seglab.workflow.runs import STARTING, ReportSteps, check_outputs, list_runs, read_manifest, utc_now

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"
TEMPLATE_NAME = "offline"
MAX_HEADLINES = 10
MAX_CLAIMS = 4


def render_notebook(notebook: Path, target: Path) -> Path:
    """Render an executed notebook to one self-contained HTML file (atomic write)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name=TEMPLATE_NAME, extra_template_basedirs=[str(TEMPLATE_DIR)])
    exporter.exclude_input_prompt = False
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    return io.write_text(target, body)


def report_path(manifest: dict) -> Path:
    return paths.reports_dir() / manifest["experiment"] / manifest["profile"] / f"{manifest['run_id']}.html"


def render_run(run_dir: Path, manifest: dict) -> Path:
    """Render the run's notebook to ``reports/<experiment>/<profile>/<run-id>.html``."""
    notebook = Path(run_dir) / f"{manifest['experiment']}.ipynb"
    return render_notebook(notebook, report_path(manifest))


def publish_figures(run_dir: Path, manifest: dict) -> list[Path]:
    """Copy a successful run's figures to ``figures/<experiment>/<profile>/`` with ``PROVENANCE.json``.

    Each published figure names the run that drew it (showyourwork's habit):
    run folder, commit, dirty flag and the figure's sha256.
    """
    source = Path(run_dir) / "figures"
    if not source.is_dir():
        return []
    target_dir = paths.figures_dir() / manifest["experiment"] / manifest["profile"]
    published, provenance = [], {}
    for fig in sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = fig.relative_to(source).as_posix()
        target = target_dir / rel
        with io.atomic_path(target) as tmp:
            shutil.copyfile(fig, tmp)
        published.append(target)
        provenance[rel] = {"run_dir": manifest["run_dir"], "run_id": manifest["run_id"],
                           "commit": (manifest.get("git") or {}).get("commit"),
                           "dirty": (manifest.get("git") or {}).get("dirty"),
                           "sha256": io.sha256_file(fig)}
    io.write_json(target_dir / "PROVENANCE.json", provenance)
    return published


def steps() -> ReportSteps:
    """The steps the runner takes after a notebook ran (:class:`seglab.workflow.runs.ReportSteps`):
    render its report, publish its figures, rebuild the status page."""
    return ReportSteps(render_run=render_run, publish_figures=publish_figures, build_index=build_index)


def _fmt_number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"


HEADLINE_ORDER = ("test_ap50", "test_", "val_", "recovery", "sig_")

SPLITS = {"test": "test", "val": "val"}
# metric in a `<split>_<metric>_<model>` key -> (words, unit); apNN (AP at IoU 0.NN) is parsed
METRICS = {"ap": ("AP", "fraction"), "f1": ("F1", "fraction"), "precision": ("precision", "fraction"),
           "recall": ("recall", "fraction"), "accuracy": ("accuracy", "fraction"),
           "pq": ("panoptic quality", "fraction"), "fp": ("false positives", "count"),
           "fn": ("false negatives", "count"), "tp": ("true positives", "count"),
           "removed_tp": ("true positives removed", "count")}
MODEL_WORDS = {"finetuned": "fine-tuned", "lomo": "marker held out", "sd": "SD"}
UNIT_TEXT = {"fraction": "fraction", "count": "count", "seconds": "s", "px": "px", "": ""}


def _words(parts: list[str]) -> str:
    return " ".join(MODEL_WORDS.get(p, p) for p in parts)


def headline_label(key: str) -> tuple[str, str]:
    """A readable label and the unit of a ``summary.json`` key: ``(label, unit)``.

    Keys follow ``<split>_<metric>_<model>`` (splits test, val; metrics ap50, ap75, ap90, f1,
    precision, recall, fp, ...); ``sig_tests_<masks>`` counts significant tests; ``n_<what>``
    counts; ``<what>_s`` is seconds. Unit is ``fraction``, ``count``, ``seconds``, ``px`` or ``""``
    (unknown). Any other key: the key with underscores as spaces, no unit.

    >>> headline_label("test_ap50_finetuned_generic")
    ('test AP@0.5, fine-tuned generic', 'fraction')
    >>> headline_label("sig_tests_truth")
    ('significant tests, truth masks', 'count')
    >>> headline_label("prepare_s")
    ('prepare', 'seconds')
    """
    parts = str(key).split("_")
    if parts[0] in SPLITS and len(parts) > 1:
        split, rest = SPLITS[parts[0]], parts[1:]
        ap = re.fullmatch(r"ap(\d\d)", rest[0])
        metric, n = None, 1
        if ap:
            metric = (f"AP@{int(ap[1]) / 100:g}", "fraction")
        else:
            for size in (2, 1):   # two-word metrics (removed_tp) first
                if "_".join(rest[:size]) in METRICS:
                    metric, n = METRICS["_".join(rest[:size])], size
                    break
        if metric is not None:
            model = _words(rest[n:])
            return f"{split} {metric[0]}" + (f", {model}" if model else ""), metric[1]
    if parts[:2] == ["sig", "tests"]:
        return "significant tests" + (f", {_words(parts[2:])} masks" if len(parts) > 2 else ""), "count"
    if parts[0] == "n" and len(parts) > 1:
        return _words(parts[1:]), "count"
    if len(parts) > 1 and parts[-1] == "s":
        return _words(parts[:-1]), "seconds"
    if len(parts) > 1 and parts[-1] == "px":
        return _words(parts[:-1]), "px"
    return str(key).replace("_", " "), ""


def headline_html(key: str, value) -> str:
    """One headline number: readable label, value with its unit; the raw key kept visible (small)."""
    e = html.escape
    label, unit = headline_label(key)
    unit_text = UNIT_TEXT.get(unit, unit)
    value_html = e(_fmt_number(value)) + (f" <span class='unit'>{e(unit_text)}</span>" if unit_text else "")
    return (f"<li title='{e(str(key))}'>{e(label)}: <b>{value_html}</b> "
            f"<code class='key'>{e(str(key))}</code></li>")


# keys of claims and intervals: shown as claims (claims_html), not as headline numbers
CLAIM_SUFFIXES = ("_ci_low", "_ci_high", "_p_value", "_n_donors", "_note")
CLAIM_KEYS = ("claims_interval", "headline_claim")


def claim_keys_of(summary: dict) -> set:
    """The keys :func:`claims_html` shows: each claim's flag and difference with its bounds,
    p-value, donors and note; any other key's ``_ci_low`` / ``_ci_high`` / ``_p_value`` /
    ``_n_donors`` / ``_note`` (E4's ranges: the range itself stays a headline number); and
    ``claims_interval``, ``headline_claim``."""
    keys = {k for k in CLAIM_KEYS if k in summary}
    for c in claims.find_claims(summary):
        keys |= {c["flag"], c["key"]}
    for k in summary:
        stem = next((str(k)[: -len(x)] for x in CLAIM_SUFFIXES if str(k).endswith(x)), None)
        if stem and f"{stem}_ci_low" in summary:
            keys.add(k)
    return keys


def headline_items(summary: dict, limit: int = MAX_HEADLINES) -> list[tuple]:
    """The numbers the status page shows: test AP@0.5 first, then other test and validation
    numbers (``<split>_<metric>_<model>``), then the rest; at most ``limit``; the keys of claims
    (:func:`claim_keys_of`) are left to :func:`claims_html`."""
    def rank(key: str) -> int:
        return next((i for i, p in enumerate(HEADLINE_ORDER) if key.startswith(p)), len(HEADLINE_ORDER))
    order, hidden = list(summary), claim_keys_of(summary)
    keys = sorted((k for k in summary if k not in hidden), key=lambda k: (rank(k), order.index(k)))
    return [(k, summary[k]) for k in keys[:limit]]


def claim_text(claim: dict) -> str:
    """One claim in words (plain text): ``fine-tuned generic beats baseline: yes, +0.052 test AP@0.5
    [0.021, 0.084], 6 donors``; ``no, the reverse holds`` when the interval lies below 0, ``not
    shown`` when it includes 0 or is missing (with why)."""
    metric = headline_label(claim["prefix"])[0] if claim["prefix"] else "difference"
    d, low, high, n = claim["difference"], claim["ci_low"], claim["ci_high"], claim["n_donors"]
    reverse = low is not None and high is not None and claims.claim_holds(low, high, "less")
    verdict = "yes" if claim["holds"] else "no, the reverse holds" if reverse else "not shown"
    words = f"{_words(claim['winner'].split('_'))} beats {_words(claim['loser'].split('_'))}: {verdict}"
    if d is None:
        return f"{words} ({claim['note'] or 'no estimate'})"
    interval = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else " (no interval)"
    donors = f", {n} donor{'s' * (n != 1)}" if n is not None else ""
    note = f"; {claim['note']}" if claim.get("note") else ""
    return f"{words}, {d:+.3f} {metric}{interval}{donors}{note}"


def claims_html(summary: dict, limit: int = MAX_CLAIMS) -> str:
    """The run's claims (:func:`seglab.evaluate.claims.find_claims`), the ``headline_claim`` first,
    at most ``limit``, under a line saying which interval decides them ('' without claims)."""
    e = html.escape
    found = claims.find_claims(summary)
    if not found:
        return ""
    first = summary.get("headline_claim")
    found.sort(key=lambda c: c["flag"] != first)
    items = "".join(f"<li class='{'holds' if c['holds'] else 'open'}' title='{e(c['flag'])}'>{e(claim_text(c))}</li>"
                    for c in found[:limit])
    more = f"<li>... {len(found) - limit} more in summary.json</li>" if len(found) > limit else ""
    interval = summary.get("claims_interval") or "95% interval"
    return (f"<div class='claims'>claims ({e(str(interval))}; yes only when the interval excludes 0):"
            f"<ul>{items}{more}</ul></div>")


def _last_done(run_dirs: list[Path], root: Path) -> dict:
    """Links to the newest successful run with a report (the last good evidence)."""
    good = next((m for m in map(read_manifest, reversed(run_dirs)) if m and m.get("status") == "done"), None)
    if good and good.get("report"):
        return {"last_done_report": os.path.relpath(root / good["report"], paths.reports_dir()),
                "last_done_run": good.get("run_id")}
    return {}


def _status_rows() -> list[dict]:
    root = paths.project_root()
    experiments = load_experiments(root)
    runs_root = paths.runs_dir()
    profiles = sorted({p.name for e in experiments for p in (runs_root / e.name).glob("*")
                       if p.is_dir() and p.name != "interactive"}) if runs_root.is_dir() else []
    rows = []
    for e in experiments:
        for profile in profiles or ["demo"]:
            run_dirs = list_runs(e.name, profile)
            row = {"experiment": e.name, "title": e.title, "profile": profile, "n_runs": len(run_dirs)}
            if not run_dirs:
                rows.append({**row, "status": "not run"})
                continue
            run_dir = run_dirs[-1]
            manifest = read_manifest(run_dir)
            if manifest is None:   # made, manifest not written yet (or cut short): a run starting
                rows.append({**row, "status": STARTING, "run_dir": os.path.relpath(run_dir, root),
                             "started": None, "git": {}, "summary": {}, "error": None, "report": None,
                             "missing": [], "changed": [], **_last_done(run_dirs, root)})
                continue
            problems = check_outputs(run_dir, manifest)
            report = manifest.get("report")
            if manifest.get("status") != "done":  # point at the last good evidence too
                row.update(_last_done(run_dirs, root))
            rows.append({**row, "status": manifest.get("status"), "started": manifest.get("started"),
                         "duration_s": manifest.get("duration_s"), "git": manifest.get("git") or {},
                         "summary": manifest.get("summary") or {}, "error": manifest.get("error"),
                         "run_dir": manifest.get("run_dir"),
                         "report": os.path.relpath(root / report, paths.reports_dir()) if report else None,
                         **problems})
    return rows


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%}
th,td{border:1px solid #ccc;padding:.35em .6em;text-align:left;vertical-align:top;font-size:14px}
th{background:#f3f3f3}
.done{color:#17672a;font-weight:600}.failed,.interrupted{color:#b00020;font-weight:600}
.running,.starting{color:#8a5a00;font-weight:600}.flag{color:#b00020;font-weight:700}
code{font-size:12px}ul{margin:0;padding-left:1.1em}
.unit{color:#666;font-size:12px}code.key{color:#777;font-size:11px}
.claims{margin-bottom:.4em}.claims li.holds{color:#17672a}.claims li.open{color:#555}
"""


def build_index() -> Path:
    """Write ``reports/index.html``: the latest run of each experiment and profile, checked."""
    e = html.escape
    rows_html = []
    for r in _status_rows():
        status = r.get("status") or "not run"
        cells = [f"<td><b>{e(r['experiment'])}</b><br>{e(r['title'])}</td>", f"<td>{e(r['profile'])}</td>",
                 f"<td class='{e(status)}'>{e(status)}</td>"]
        if status == "not run":
            cells += ["<td></td>"] * 5
        elif status == STARTING:
            link = ""
            if r.get("last_done_report"):
                link = (f"last successful: <a href='{e(r['last_done_report'])}'>"
                        f"{e(r['last_done_run'])}</a><br>")
            cells += [f"<td>no manifest yet; {r['n_runs']} run(s)</td>", "<td></td>", "<td></td>",
                      f"<td>{link}<code>{e(str(r.get('run_dir')))}</code></td>", "<td></td>"]
        else:
            git = r["git"]
            commit = (git.get("commit") or "no git")[:10] + (" (dirty)" if git.get("dirty") else "")
            heads = headline_items(r.get("summary") or {})
            head_html = claims_html(r.get("summary") or {})
            head_html += "<ul>" + "".join(headline_html(k, v) for k, v in heads) + "</ul>" if heads else ""
            if r.get("error"):
                err = r["error"]
                head_html += f"<div class='failed'>{e(str(err.get('ename')))}: {e(str(err.get('evalue')))}</div>"
            flags = [f"<div class='flag'>MISSING {e(p)}</div>" for p in r.get("missing", [])]
            flags += [f"<div class='flag'>CHANGED {e(p)}</div>" for p in r.get("changed", [])]
            link = f"<a href='{e(r['report'])}'>report</a>" if r.get("report") else ""
            if r.get("last_done_report"):
                link += (f"<br>last successful: <a href='{e(r['last_done_report'])}'>"
                         f"{e(r['last_done_run'])}</a>")
            cells += [f"<td>{e(str(r.get('started') or ''))}<br>{e(_fmt_number(r.get('duration_s') or 0))} s; "
                      f"{r['n_runs']} run(s)</td>",
                      f"<td><code>{e(commit)}</code></td>", f"<td>{head_html}</td>",
                      f"<td>{link}<br><code>{e(str(r.get('run_dir')))}</code></td>",
                      f"<td>{''.join(flags) or 'outputs intact'}</td>"]
        rows_html.append("<tr>" + "".join(cells) + "</tr>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>seglab status</title><style>{STYLE}</style></head>
<body><h1>seglab: experiments and their latest runs</h1>
<p>Built {e(utc_now())}. One row per experiment and profile; outputs are checked against the sha256 in each run's manifest.</p>
<table><thead><tr><th>experiment</th><th>profile</th><th>status</th><th>latest run</th><th>commit</th>
<th>headline numbers</th><th>report / run folder</th><th>outputs</th></tr></thead>
<tbody>{''.join(rows_html)}</tbody></table></body></html>
"""
    return io.write_text(paths.reports_dir() / "index.html", page)
