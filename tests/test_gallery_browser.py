"""The annotation gallery in a real browser: Debian's headless Chromium driven by selenium.

The gallery of 12 hand-drawn objects (tests/test_gallery.py's tiles), 5 cards per page, is opened
from ``file://``: answers given by click and by key (y / n / u, arrows), page changes by key,
a reload keeps the answers (localStorage), the exported file (a Blob download into a folder set by
Chrome's prefs) is compared with the answers given, an import merges another annotator's file and
a file of another export is refused on the page. The browser's own request log (the performance
log of the DevTools Network domain) must hold no request of any scheme but ``file:``, ``data:``
and ``blob:``; a positive control shows the log sees a page's remote request.

selenium starts Debian's ``chromedriver`` and ``chromium`` by path (``Service(executable_path)``,
``binary_location``), so selenium-manager never looks for (or downloads) a browser.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from seglab.curate import answers as ans

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

_missing = [name for name, ok in (("chromium", CHROMIUM), ("chromedriver (apt-get install chromium-driver)",
                                                             CHROMEDRIVER), ("selenium (pip install -e '.[test]')",
                                                                             HAVE_SELENIUM)) if not ok]
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(bool(_missing), reason=f"not installed: {', '.join(_missing)} (.ci/run installs "
                                                        "chromium and chromium-driver)")]
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900"]
WAIT_S = 10.0


def start_browser(workdir: Path, downloads: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={workdir / 'profile'}")
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False,
                                           "safebrowsing.enabled": False})
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(workdir / "driver.log")),
                              options=opts)
    # headless Chrome takes downloads only when told where (prefs alone are not always honoured)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def requested_urls(driver) -> list[str]:
    """Every URL the browser sent a request for since the last call (DevTools Network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def wait_for(cond, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < WAIT_S:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    work = tmp_path_factory.mktemp("chrome")
    downloads = work / "downloads"
    downloads.mkdir()
    driver = start_browser(work, downloads)
    try:
        yield driver, downloads
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    from test_gallery import PIXEL, make_tile_run

    from seglab.curate import gallery

    root = tmp_path_factory.mktemp("gal")
    tiles, pred, _ = make_tile_run(root / "run", confidence=True)
    gallery.gallery_from_predict(pred, tiles, root / "g", pixel_size_um=PIXEL, per_page=5, crop_px=32,
                                 cell_type="lymphocyte", log=None)
    return root / "g"


def test_the_request_log_sees_a_remote_request(browser, tmp_path):
    driver, _ = browser
    page = tmp_path / "external.html"
    page.write_text('<html><body><img src="http://198.51.100.1/x.png"></body></html>')
    requested_urls(driver)
    driver.get(page.as_uri())
    wait_for(lambda: any(u.startswith("http://198.51.100.1") for u in requested_urls(driver)), "the remote request")


def test_annotate_page_reload_export_import_offline(browser, gallery_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, downloads = browser
    g = json.loads((gallery_dir / "gallery.json").read_text())
    ids = [o["object_id"] for o in g["objects"]]
    requested_urls(driver)
    driver.get_log("browser")     # drained: the logs below are this page's
    driver.get((gallery_dir / "index.html").as_uri())
    wait_for(lambda: driver.execute_script("return document.body.getAttribute('data-ready')") == "1", "the gallery")

    def cards():
        return driver.find_elements(By.CSS_SELECTOR, "#cards .card")

    def page():
        return int(driver.execute_script("return document.body.getAttribute('data-page')"))

    def focused():
        return driver.execute_script("return document.body.getAttribute('data-focus')")

    def progress():
        return driver.find_element(By.ID, "progress").text

    body = driver.find_element(By.TAG_NAME, "body")
    assert [c.get_attribute("data-id") for c in cards()] == ids[:5] and page() == 1
    first = cards()[0]
    assert first.find_element(By.CSS_SELECTOR, ".area").text == "12.0 um^2 | 48 px"
    assert "confidence 0.1" in first.find_element(By.CSS_SELECTOR, ".feat").text
    assert driver.execute_script("return arguments[0].naturalWidth", first.find_element(By.TAG_NAME, "img")) == 32
    driver.find_element(By.ID, "annotator").send_keys("ana", Keys.TAB)
    # by click: card 2 no; by key: the focus moves to card 3 after the click's card, y answers it
    cards()[1].find_element(By.CSS_SELECTOR, 'button[data-a="no"]').click()
    assert focused() == ids[1]
    body.send_keys(Keys.ARROW_RIGHT)
    assert focused() == ids[2]
    body.send_keys("y")          # answers card 3, the focus moves on to card 4
    assert focused() == ids[3]
    body.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT, Keys.ARROW_LEFT)
    assert focused() == ids[0]
    body.send_keys("u")
    assert progress() == "3 / 12 answered (yes 1, no 1, unsure 1)"
    # up and down move by a row: two cards a row in a narrow window
    driver.set_window_size(420, 900)
    body.send_keys(Keys.ARROW_DOWN)
    assert focused() == ids[3]
    body.send_keys(Keys.ARROW_UP)
    assert focused() == ids[1]
    driver.set_window_size(1200, 900)
    assert [c.get_attribute("data-answer") for c in cards()] == ["unsure", "no", "yes", "", ""]
    # page keys: PageDown and ] forward, [ back
    body.send_keys(Keys.PAGE_DOWN)
    assert page() == 2 and [c.get_attribute("data-id") for c in cards()] == ids[5:10]
    body.send_keys("n")          # the first card of page 2
    body.send_keys("]")
    assert page() == 3 and len(cards()) == 2
    body.send_keys("[", Keys.PAGE_UP)
    assert page() == 1
    # a reload keeps every answer (localStorage keyed by the export id)
    driver.refresh()
    wait_for(lambda: driver.execute_script("return document.body.getAttribute('data-ready')") == "1", "the reload")
    assert progress() == "4 / 12 answered (yes 1, no 2, unsure 1)"
    assert [c.get_attribute("data-answer") for c in cards()] == ["unsure", "no", "yes", "", ""]
    assert driver.find_element(By.ID, "annotator").get_attribute("value") == "ana"
    # export: the downloaded file is the answers given, and loads in the library
    driver.find_element(By.ID, "export").click()
    path = wait_for(lambda: [p for p in downloads.glob("answers-*.json")], "the download")[0]
    time.sleep(0.2)
    data = json.loads(path.read_text())
    want = {ids[0]: "unsure", ids[1]: "no", ids[2]: "yes", ids[5]: "no"}
    assert data["answers"] == want and data["annotator"] == "ana" and data["export_id"] == g["export_id"]
    assert path.name == f"answers-lymphocyte-ana-{g['export_id'][:12]}.json"
    table = ans.load_answers(path, gallery_dir)
    assert dict(zip(table["object_id"], table["answer"])) == want
    # import another annotator's file: new answers added, disagreements named, ours kept
    other = ans.write_answers(tmp_path / "ben.json", gallery_dir, {ids[1]: "yes", ids[2]: "yes", ids[7]: "no"}, "ben")
    driver.find_element(By.ID, "import").send_keys(str(other))
    msg = wait_for(lambda: driver.find_element(By.ID, "message").text, "the import message")
    assert msg == f"Imported ben.json (ben): 1 new, 1 the same, 1 disagree (yours kept): {ids[1]}."
    assert progress() == "5 / 12 answered (yes 1, no 3, unsure 1)"
    # a file of another export is refused with a readable message, nothing changes
    foreign = json.loads(other.read_text())
    foreign.update(area_filter={"min_um2": 10.0, "max_um2": None})
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    driver.find_element(By.ID, "import").send_keys(str(tmp_path / "foreign.json"))
    wait_for(lambda: "foreign.json" in driver.find_element(By.ID, "message").text, "the refusal")
    box = driver.find_element(By.ID, "message")
    assert box.get_attribute("class") == "error"
    assert box.text == ("foreign.json: answers made under area filter 10-inf um^2, but this gallery uses 0-inf um^2. "
                        "Open the gallery these answers were made on.")
    assert progress() == "5 / 12 answered (yes 1, no 3, unsure 1)"
    # sort by confidence (0.1 to 0.85 in each tile; ties in export order) and filter by area (um^2)
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "sort")).select_by_value("conf-desc")
    assert [c.get_attribute("data-id") for c in cards()] == [ids[5], ids[11], ids[4], ids[10], ids[3]]
    Select(driver.find_element(By.ID, "sort")).select_by_value("area-asc")
    area_min = driver.find_element(By.ID, "area-min")
    area_min.send_keys("40", Keys.TAB)      # 160 px and more at 0.5 um/px
    assert [c.get_attribute("data-id") for c in cards()] == [ids[5], ids[3], ids[11]]
    assert driver.find_element(By.ID, "pageinfo").text == "page 1 of 1 (3 shown of 12)"
    Select(driver.find_element(By.ID, "show")).select_by_value("no")
    area_min.clear()
    area_min.send_keys(Keys.TAB)
    assert sorted(c.get_attribute("data-id") for c in cards()) == sorted([ids[1], ids[5], ids[7]])
    # nothing left the machine: every request was for a file (crops, script, styles) or the Blob
    urls = requested_urls(driver)
    assert urls and all(u.startswith(("file:", "data:", "blob:")) for u in urls), [
        u for u in urls if not u.startswith(("file:", "data:", "blob:"))]
    assert any(u.endswith(".png") for u in urls) and any(u.endswith("gallery.js") for u in urls)
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
