"""A real browser opens the status page and a report: it renders, and the page asks the network for nothing.

Headless Chromium (Debian's package; .ci/run installs it) writes a NetLog of
every request. Chromium itself phones home (update checks, accounts) even with
the background-networking flags, so page requests are told apart by their
network isolation key, which is ``file://`` for requests a file:// page makes.
A positive control (a page with an external script and image) proves the
detector sees page requests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from seglab.workflow import pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; .ci/run does)")]


def open_in_chromium(page: Path, workdir: Path) -> tuple[str, np.ndarray, list[str]]:
    """(DOM after scripts ran, screenshot as an RGB array, URLs the page itself requested)."""
    workdir.mkdir(parents=True, exist_ok=True)
    netlog, shot = workdir / "netlog.json", workdir / "shot.png"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={workdir / 'profile-dom'}", f"--log-net-log={netlog}",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={workdir / 'profile-shot'}", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, text=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    page_urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        url = params.get("url", "")
        if (event["type"] == start_job and str(params.get("network_isolation_key", "")).startswith("file://")
                and not url.startswith(("file:", "data:"))):
            page_urls.append(url)
    return dom, pixels, page_urls


def test_detector_sees_requests_of_a_page_with_external_resources(tmp_path):
    page = tmp_path / "external.html"
    page.write_text('<html><body><h1>x</h1><img src="http://198.51.100.1/x.png">'
                    '<script src="https://cdn.invalid/require.js"></script></body></html>')
    _, _, urls = open_in_chromium(page, tmp_path / "chrome")
    assert "http://198.51.100.1/x.png" in urls and "https://cdn.invalid/require.js" in urls


def test_status_page_and_report_render_offline(probe_root, tmp_path):
    result = pipeline.execute("10", "test", log=lambda *_: None)
    index = probe_root / "reports" / "index.html"
    dom, pixels, urls = open_in_chromium(index, tmp_path / "index")
    assert "10_probe" in dom and "11_after" in dom and "sum_of_squares" in dom
    assert urls == []
    assert pixels.std() > 0.01, "the screenshot is blank"
    report_page = probe_root / result.manifest["report"]
    dom, pixels, urls = open_in_chromium(report_page, tmp_path / "report")
    assert "A notebook that writes a table" in dom and "data:image/png;base64" in dom
    assert urls == [], f"the report asked the network for {urls}"
    assert pixels.std() > 0.01
