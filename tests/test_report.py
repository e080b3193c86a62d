"""The Snakemake HTML report of a real run, opened in headless Chromium: its tables and images
render, with our numbers in them."""

import shutil
import tempfile

import pandas as pd
import pytest
from conftest import snakemake

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
    "chromium-driver; .ci/run installs them)")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open_result(driver, category, label):
    """Click a result category, then the eye of the entry whose row shows ``label``."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.LINK_TEXT, category).click()
    rows = [r for r in driver.find_elements(By.CSS_SELECTOR, "tr") if label in r.text]
    assert rows, f"no entry {label!r} under {category!r}"
    rows[0].find_elements(By.TAG_NAME, "a")[0].click()


@pytest.mark.xdist_group("tiny_run")
def test_report_renders_tables_and_images(tiny_run, browser):
    from selenium.webdriver.common.by import By

    config, out = tiny_run
    report = out / "report.html"
    r = snakemake("reproduce_table", "--configfile", config, "--report", report)
    assert r.returncode == 0, r.stderr[-3000:]
    browser.get(report.as_uri())
    for category in ("Table 1", "Fig. 3 ablations", "Fig. 4", "Samples", "Training"):
        assert browser.find_elements(By.LINK_TEXT, category), category
    # Table 1 renders as a table holding the CD 1-step FID of table1.csv.
    table = pd.read_csv(out / "tables" / "table1.csv").set_index(["method", "steps"])
    _open_result(browser, "Table 1", "ours")
    browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
    cells = [c.text for c in browser.find_elements(By.TAG_NAME, "td")]
    assert f"{table.loc[('cd', 1), 'fid']:.3f}" in cells
    assert "CD" in cells and "EDM teacher (Heun)" in cells
    browser.switch_to.default_content()
    # A sample grid renders as a decoded image.
    browser.get(report.as_uri())
    _open_result(browser, "Samples", "cd")
    images = [i for i in browser.find_elements(By.TAG_NAME, "img")
              if browser.execute_script("return arguments[0].naturalWidth", i) > 100]
    assert images, "no sample grid rendered"
