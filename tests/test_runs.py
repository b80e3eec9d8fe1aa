"""The papermill runner: run folders, manifests, failures, interruptions, run-all and the status page."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seglab.workflow import pipeline, report, runs

SEGLAB = [sys.executable, "-m", "seglab"]
EXTERNAL_REF = re.compile(r"<(script|link|img|iframe)[^>]+(src|href)\s*=\s*[\"']?(https?:)?//|@import\s+(url\()?[\"']?(https?:)?//",
                          re.I)


def cli(root: Path, *args, timeout=120):
    env = {**os.environ, "SEGLAB_ROOT": str(root)}
    return subprocess.run([*SEGLAB, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def test_run_writes_notebook_params_outputs_manifest_and_offline_report(probe_root):
    result = pipeline.execute("10", "test", log=lambda *_: None)
    run_dir = result.run_dir
    assert run_dir.parent == probe_root / "runs" / "10_probe" / "test"
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "done" and m["error"] is None
    assert m["params_hash"] == runs.params_hash({"n": 4, "fail": False, "sleep_s": 0.0, "label": "shared-label"})
    assert m["summary"] == {"n": 4, "sum_of_squares": 14, "label": "shared-label"}
    assert set(m) >= {"git", "packages", "host", "slurm", "started", "ended", "inputs", "outputs", "report"}
    assert m["packages"]["cellpose"] == "4.2.1.1"
    outputs = {o["path"]: o for o in m["outputs"]}
    assert {"10_probe.ipynb", "params.yaml", "squares.csv", "figures/squares.png", "summary.json", "kernel.log"} <= set(outputs)
    assert outputs["squares.csv"]["sha256"] == runs.io.sha256_file(run_dir / "squares.csv")
    executed = json.loads((run_dir / "10_probe.ipynb").read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])
    html_page = (probe_root / m["report"]).read_text()
    assert "sum_of_squares" in html_page and "data:image/png;base64" in html_page
    assert not EXTERNAL_REF.search(html_page), EXTERNAL_REF.search(html_page)
    published = probe_root / "figures" / "10_probe" / "test"
    assert (published / "squares.png").is_file()
    assert json.loads((published / "PROVENANCE.json").read_text())["squares.png"]["run_id"] == run_dir.name


def test_same_notebook_twice_gives_two_run_folders_and_index_flags_missing_and_changed(probe_root):
    first = pipeline.execute("10_probe", "test", log=lambda *_: None).run_dir
    second = pipeline.execute("10_probe", "test", log=lambda *_: None).run_dir
    assert first != second and first.is_dir() and second.is_dir()
    index = (probe_root / "reports" / "index.html").read_text()
    assert "10_probe" in index and "11_after" in index and "outputs intact" in index
    # headline numbers with readable labels, the raw summary.json key kept beside them
    assert "sum of squares: <b>14</b> <code class='key'>sum_of_squares</code>" in index
    assert "<li title='n'>n: <b>4</b>" in index
    (second / "squares.csv").unlink()
    (second / "summary.json").write_text("{}")
    index = report.build_index().read_text()
    assert "MISSING squares.csv" in index and "CHANGED summary.json" in index


def test_failing_cell_exits_nonzero_with_one_paragraph_and_keeps_partial_notebook(probe_root):
    proc = cli(probe_root, "run", "10", "--profile", "test", "--set", "fail=true")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert re.search(r"failed in cell \d+ \(In \[\d+\]\): ValueError: boom on purpose", proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1
    run_dir = runs.latest_run("10_probe", "test", status=None)
    m = runs.read_manifest(run_dir)
    assert m["status"] == "failed" and m["error"]["ename"] == "ValueError"
    executed = json.loads((run_dir / "10_probe.ipynb").read_text())
    assert any(o.get("ename") == "ValueError" for c in executed["cells"] for o in c.get("outputs", []))
    assert (probe_root / m["report"]).is_file()
    assert "failed" in (probe_root / "reports" / "index.html").read_text()
    good = pipeline.execute("10", "test", log=lambda *_: None)
    cli(probe_root, "run", "10", "--profile", "test", "--set", "fail=true")
    index = (probe_root / "reports" / "index.html").read_text()
    assert f"last successful: <a href='10_probe/test/{good.run_dir.name}.html'>" in index


def test_sigterm_marks_the_run_interrupted(probe_root):
    env = {**os.environ, "SEGLAB_ROOT": str(probe_root)}
    proc = subprocess.Popen([*SEGLAB, "run", "10", "--profile", "test", "--set", "sleep_s=60"], cwd=probe_root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    log = None
    while time.monotonic() < deadline:  # wait until the kernel is inside the sleeping cell
        logs = list((probe_root / "runs").rglob("kernel.log"))
        run_dirs = list((probe_root / "runs").rglob("squares.csv"))
        if logs and run_dirs:
            log = logs[0]
            break
        time.sleep(0.2)
    assert log is not None, "the run never started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "was interrupted" in err and "Traceback" not in err
    m = runs.read_manifest(log.parent)
    assert m["status"] == "interrupted" and m["ended"] is not None
    assert (log.parent / "10_probe.ipynb").is_file()


def test_misspelt_key_fails_before_any_run_folder_is_made(probe_root):
    (probe_root / "params" / "test" / "10_probe.yaml").write_text("n: 4\nfial: true\n")
    proc = cli(probe_root, "run", "10", "--profile", "test")
    assert proc.returncode == 1
    assert "unknown key 'fial' (did you mean 'fail'?)" in proc.stderr and "allowed keys" in proc.stderr
    assert not (probe_root / "runs").exists()


def test_run_all_skips_up_to_date_reruns_on_change_and_stops_at_failure(probe_root):
    messages = []
    first = pipeline.run_all("test", log=messages.append)
    assert [r.skipped for r in first] == [False, False]
    assert runs.read_manifest(first[1].run_dir)["summary"] == {"scaled": 42}
    again = pipeline.run_all("test", log=messages.append)
    assert [r.skipped for r in again] == [True, True]
    assert any("up to date" in m for m in messages)
    # a changed params file reruns the notebook, and its dependant because its upstream run changed
    (probe_root / "params" / "test" / "10_probe.yaml").write_text("n: 5\n")
    changed = pipeline.run_all("test", log=messages.append)
    assert [r.skipped for r in changed] == [False, False]
    assert runs.read_manifest(changed[1].run_dir)["summary"] == {"scaled": 90}
    # a changed notebook reruns too
    nb = probe_root / "notebooks" / "11_after.ipynb"
    nb.write_text(nb.read_text().replace("factor = 2", "factor = 5"))
    assert [r.skipped for r in pipeline.run_all("test", log=messages.append)] == [True, False]
    # --force reruns everything
    assert [r.skipped for r in pipeline.run_all("test", force=True, log=messages.append)] == [False, False]
    # a failure stops the chain and names the notebook
    (probe_root / "params" / "test" / "10_probe.yaml").write_text("n: 5\nfail: true\n")
    before = len(runs.list_runs("11_after", "test"))
    with pytest.raises(runs.RunFailed, match="10_probe \\(test\\) failed in cell"):
        pipeline.run_all("test", log=messages.append)
    assert len(runs.list_runs("11_after", "test")) == before


def test_deleted_output_makes_run_all_rerun(probe_root):
    first = pipeline.run_all("test", only=["10"], log=lambda *_: None)
    assert len(first) == 1
    (first[0].run_dir / "squares.csv").unlink()
    assert pipeline.run_all("test", only=["10"], log=lambda *_: None)[0].skipped is False


def test_interactive_attach_makes_its_own_folder(probe_root, monkeypatch):
    monkeypatch.chdir(probe_root / "notebooks")  # JupyterLab's working folder
    run = runs.attach("10_probe")
    assert run.run_dir.parent == probe_root / "runs" / "10_probe" / "interactive"
    run.summary(a=1)
    assert run.summary(b=2) == {"a": 1, "b": 2}
    other = runs.attach("10_probe")
    assert other.run_dir != run.run_dir


def test_atomic_write_keeps_old_content_on_error_and_umask_mode(tmp_path):
    target = tmp_path / "t.txt"
    runs.io.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with runs.io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~mask
    with pytest.raises(FileExistsError):
        runs.io.write_text(target, "new", overwrite=False)


def test_unknown_experiment_lists_known(probe_root):
    proc = cli(probe_root, "run", "42", "--profile", "test")
    assert proc.returncode == 1 and "no experiment '42'; known: 10_probe, 11_after" in proc.stderr


def test_test_split_is_evaluated_once_per_selected_configuration(probe_root):
    run = runs.attach("10_probe")
    run.record_test_evaluation("finetuned_generic", {"flow_threshold": 0.4, "cellprob_threshold": 0.0})
    run.record_test_evaluation("baseline", {"flow_threshold": 0.6, "cellprob_threshold": -1.0})
    with pytest.raises(runs.SeglabError, match="already evaluated for 'baseline'"):
        run.record_test_evaluation("baseline", {"flow_threshold": 0.2, "cellprob_threshold": 0.0})
    records = json.loads((run.run_dir / "test_evaluations.json").read_text())
    assert [r["selected"] for r in records] == ["finetuned_generic", "baseline"]


def test_status_page_puts_test_ap50_first():
    from seglab.workflow.report import headline_items

    summary = {"cellprob_threshold_selected": -1.0, "n_tiles": 480, "val_f1_selected": 0.9,
               "test_f1_finetuned": 0.91, "test_ap50_baseline": 0.75, "test_ap50_finetuned": 0.83}
    keys = [k for k, _ in headline_items(summary, limit=4)]
    assert keys == ["test_ap50_baseline", "test_ap50_finetuned", "test_f1_finetuned", "val_f1_selected"]


def test_sigterm_inside_an_asyncio_callback_stops_the_event_loop():
    """papermill's kernel client runs zmq callbacks in asyncio; a SIGTERM that lands in one must
    still end the run (asyncio logs and swallows ordinary exceptions from callbacks, so the run
    would wait forever on a future nobody resolves)."""
    import asyncio

    from seglab.workflow import runs

    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        loop.call_soon(runs._raise_terminated, signal.SIGTERM, None)
        loop.call_later(2.0, fut.set_result, "swallowed")  # what happens if the signal is lost
        with pytest.raises(runs._Terminated):
            loop.run_until_complete(fut)
    finally:
        loop.close()


def test_read_manifest_is_none_for_a_manifest_missing_cut_short_or_not_a_record(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert runs.read_manifest(run_dir) is None                                   # made, not written yet
    for content in (b"", b'{"experiment": "10_probe", "sta', b'{"title": "caf\xc3', b"[1, 2]", b"null"):
        (run_dir / "manifest.json").write_bytes(content)
        assert runs.read_manifest(run_dir) is None, content
    assert runs.read_manifest(tmp_path / "no-such-run") is None
    (run_dir / "manifest.json").write_text('{"status": "done"}')
    assert runs.read_manifest(run_dir) == {"status": "done"}


def test_a_run_folder_without_a_complete_manifest_is_starting_on_the_status_page_and_run_all_skips_it(probe_root):
    """A run folder exists (exclusive mkdir) a moment before its manifest.json: the status page, run-all,
    latest_run and is_up_to_date must read it as a run starting, never crash on it."""
    done = pipeline.run_all("test", only=["10"], log=lambda *_: None)[0].run_dir
    base = done.parent
    index = probe_root / "reports" / "index.html"
    for kind, content in (("truncated", '{"experiment": "10_probe", "profile": "test", "status": "runn'),
                          ("missing", None)):
        starting = base / (runs.new_run_id() if kind == "truncated" else "29991231T235959Z-ffff")
        starting.mkdir()
        if content is not None:
            (starting / "manifest.json").write_text(content)
        assert runs.latest_run("10_probe", "test") == done
        assert runs.latest_run("10_probe", "test", status=None) == done
        experiment = runs.find_experiment("10_probe", probe_root)
        assert runs.is_up_to_date(experiment, "test") == done
        messages = []
        (result,) = pipeline.run_all("test", only=["10"], log=messages.append)
        assert result.skipped and result.run_dir == done, kind
        proc = cli(probe_root, "report")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        page = index.read_text()
        row = next(r for r in page.split("<tr>") if "10_probe" in r)
        assert "class='starting'>starting<" in row, (kind, row)
        assert starting.name in row and "no manifest yet" in row
        assert f"last successful: <a href='10_probe/test/{done.name}.html'>" in row
        rows = {r["experiment"]: r for r in report._status_rows()}
        assert rows["10_probe"]["status"] == "starting" and rows["10_probe"]["n_runs"] == 2 + (kind == "missing")


def test_the_runner_never_imports_the_reports_and_runs_without_them(probe_root):
    """workflow.runs -> workflow.report was an import cycle: the report steps come from the caller."""
    proc = subprocess.run([sys.executable, "-c", "import sys, seglab.workflow.runs as r; "
                           "assert 'seglab.workflow.report' not in sys.modules, 'runs imported report'; "
                           "import seglab.workflow.pipeline"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = runs.execute("10", "test", log=lambda *_: None)          # no report steps: the run only
    assert result.manifest["report"] is None and result.manifest["status"] == "done"
    assert not (probe_root / "reports").exists() and not (probe_root / "figures").exists()
    steps = report.steps()
    assert (steps.render_run, steps.publish_figures, steps.build_index) == (
        report.render_run, report.publish_figures, report.build_index)
