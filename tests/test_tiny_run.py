"""Everything that reads the session's tiny run (.test/config/config.yaml, reproduce_table and
reproduce_extras in one DAG), in one file so that pytest-xdist (--dist loadfile) runs it once:
the tables and figures it writes, what an edit of its config reruns, released models scored in
its results folder, and its Snakemake report opened in headless Chromium."""

import copy
import json
import math
import re
import shutil
import sys
import tempfile

import pandas as pd
import pytest
import yaml
from conftest import ROOT, openai_release, run, snakemake

# ----------------------------------------------------------------------------------------------
# The tables and figures of the tiny run.


def test_tiny_pipeline_end_to_end(tiny_run):
    config, out = tiny_run
    table = pd.read_csv(out / "tables" / "table1.csv")
    expected = {("teacher", 4), ("cd", 1), ("cd", 2), ("ct", 1), ("ct", 2), ("pd", 1),
                ("pd", 2), ("untrained", 1)}
    assert set(zip(table["method"], table["steps"], strict=True)) == expected
    for column in ("fid", "isc", "precision", "recall"):
        assert all(math.isfinite(v) for v in table[column]), column
    assert table.set_index("method").loc["teacher", "nfe"] == 7  # Heun: 2 * 4 - 1
    assert (table["feature_extractor"].str.contains("classifier")).all()
    assert "| CD" in (out / "tables" / "table1.md").read_text()
    paper = (out / "tables" / "table1_paper.md").read_text()
    assert "not comparable" in paper and "3.55" in paper and "2.04" in paper
    # Fig. 4: every (method, steps) of the curve, with the taus that were used.
    fig4 = pd.read_csv(out / "tables" / "fig4_steps.csv")
    assert sorted(zip(fig4["method"], fig4["steps"], strict=True)) == sorted(
        (m, n) for m in ("cd", "ct", "pd") for n in (1, 2, 4))
    # ... the searched ones: tau_1 for 2 steps, tau_1..tau_3 for 4 (a greedy prefix).
    taus = json.loads((out / "taus" / "cd.json").read_text())["taus"]
    assert set(fig4.loc[fig4["method"] == "cd", "taus"]) == {
        "-", f"{taus[0]:g}", " ".join(f"{t:g}" for t in taus)}
    assert (out / "plots" / "fig4_steps.png").stat().st_size > 0
    # Fig. 3: each panel's mean and spread are those of the per-seed score files.
    fig3a = pd.read_csv(out / "tables" / "fig3a.csv").set_index(["run", "iters"])
    seeds = pd.concat(pd.read_csv(out / "ablations" / "cd-heun-N6-l1" / f"seed{s}" / "scores.csv")
                      for s in (0, 1)).groupby("iters")["fid"]
    assert list(seeds.count()) == [2, 2]  # snapshots at 2 and 4 iterations
    for it, fids in seeds:
        assert fig3a.loc[("cd-heun-N6-l1", it), "fid_mean"] == pytest.approx(fids.mean())
        assert fig3a.loc[("cd-heun-N6-l1", it), "fid_std"] == pytest.approx(fids.std())
    assert sorted(pd.read_csv(out / "tables" / "fig3b.csv")["run"].unique()) == [
        "cd-euler-N4-l2"]
    assert "fixed N=5, mu=0.9" in (out / "tables" / "fig3d.md").read_text()
    # Provenance: the resolved config lies beside the results.
    assert "code version" in (out / "config.yaml").read_text()
    # Every file inside the hostile outdir (conftest.HOSTILE_OUTDIR): no path was split or run.
    beside = {p.name for p in out.parent.iterdir() if not p.name.startswith("edited")}
    assert beside == {"config.yaml", out.name}
    assert not list(out.parent.rglob("PWNED")) and not (ROOT / "PWNED").exists()
    # A second run has nothing to do.
    again = snakemake("reproduce_table", "-n", "--configfile", config)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_tiny_extras_end_to_end(tiny_run):
    # iCT, ECT, continuous-time CD / CT, sCT / sCD rows, searched taus and the editing grids.
    config, out = tiny_run
    table = pd.read_csv(out / "tables" / "table1_extended.csv")
    for method in ("ict", "ect", "cd_cont", "ct_cont", "sct", "scd", "cd", "teacher"):
        rows = table[table["method"] == method]
        assert len(rows) == (1 if method == "teacher" else 2), method
        assert rows["fid"].map(math.isfinite).all(), method
    # The multistep samplers used the searched taus, not the configured ones; the search kept
    # the best of its last round.
    search = json.loads((out / "taus" / "cd.json").read_text())
    assert len(search["taus"]) == 3 and search["taus"][0] != 0.8
    last = [t for t in search["trace"] if len(t["taus"]) == 3]
    assert search["trace"][-1] == {"taus": search["taus"], "fid": min(t["fid"] for t in last)}
    meta = json.loads((out / "samples" / "cd" / "steps2.json").read_text())
    assert meta["taus"] == search["taus"][:1]
    assert table.set_index(["method", "steps"]).loc[("ict", 2), "taus"] == \
        f"{json.loads((out / 'taus' / 'ict.json').read_text())['taus'][0]:g}"
    for task in ("inpaint", "interpolate"):
        assert (out / "plots" / f"edit_{task}.png").stat().st_size > 1000, task
    # Table 1's rows scored by torch-fidelity and clean-fid side by side: the same classifier
    # features, FIDs apart by their square roots of a singular S_g S_r (120 samples of 128-d
    # features), at most 1e-8 (relative) when measured.
    evaluators = pd.read_csv(out / "tables" / "evaluators.csv")
    assert len(evaluators) == 8 and (evaluators["fid_rel_diff"].abs() < 1e-6).all()


# The steps that only read JSON and CSV files start without torch.
WITHOUT_TORCH = """import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Blocked())
from cmcore.cli import main
sys.exit(main())
"""


def test_table_steps_run_without_torch(tiny_run, tmp_path):
    # With torch blocked, cm table, figure4 and ablation-report write Table 1, Fig. 4's and
    # Fig. 3's tables as the tiny run's jobs wrote them.
    config, out = tiny_run

    def without_torch(step, *args):
        r = run([sys.executable, "-c", WITHOUT_TORCH, step, "--config", out / "config.yaml",
                 *args])
        assert r.returncode == 0, r.stderr[-2000:]

    def metrics(*runs):
        return [out / "metrics" / method / f"steps{steps}.json" for method, steps in runs]

    without_torch("table", "--metrics", *metrics(
        ("teacher", 4), ("cd", 1), ("cd", 2), ("ct", 1), ("ct", 2), ("pd", 1), ("pd", 2),
        ("untrained", 1)), "--out", tmp_path / "table1.csv")
    without_torch("figure4", "--metrics", *metrics(
        *((m, n) for m in ("cd", "ct", "pd") for n in (1, 2, 4))),
        "--out", tmp_path / "fig4_steps.csv", "--plot", tmp_path / "fig4_steps.png")
    without_torch("ablation-report", "--scores",
                  *sorted((out / "ablations").glob("*/*/scores.csv")), "--out", tmp_path,
                  "--plots", tmp_path)
    for table in ("table1", "fig4_steps", *(f"fig3{panel}" for panel in "abcd")):
        assert (tmp_path / f"{table}.csv").read_text() == \
            (out / "tables" / f"{table}.csv").read_text(), table


# ----------------------------------------------------------------------------------------------
# What an edit reruns: the steps whose settings it changes and what reads their outputs.


def planned_jobs(config, target="reproduce_table"):
    """{rule: [outputs of each job]} that a dry run of ``target`` plans for ``config``."""
    r = snakemake(target, "-n", "--configfile", config)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = r.stdout + r.stderr
    if "Nothing to be done" in text:
        return {}
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text)[1:]:
        rule = re.match(r"(?:local)?rule (\w+):", block)[1]
        outputs = re.search(r"\n\s+output: (.*)", block)
        jobs.setdefault(rule, []).append(outputs[1].split(", ") if outputs else [])
    return jobs


@pytest.fixture
def edited(tiny_run):
    """Write the tiny run's config with one edit (section -> dict, or key -> value) to a new
    file; the tiny run's own config file is left as it was."""
    config, out = tiny_run
    original = yaml.safe_load(config.read_text())
    paths = []

    def write(**changes):
        cfg = copy.deepcopy(original)
        for key, value in changes.items():
            if isinstance(value, dict):
                cfg[key] = {**cfg.get(key, {}), **value}
            else:
                cfg[key] = value
        path = config.parent / f"edited{len(paths)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        paths.append(path)
        return path

    yield write, out


def test_theorem1_edit_reruns_theorem1_only(edited):
    write, out = edited
    jobs = planned_jobs(write(theorem1={"N_gap": [8, 32, 64]}))
    assert set(jobs) == {"theorem1", "reproduce_table"}, jobs
    assert len(jobs["theorem1"]) == 1


def test_evaluator_keys_rerun_the_evaluator_table_only(edited):
    write, out = edited
    changed = write(evaluation={"dinov2_arch": "vit_small_patch14_dinov2"})
    assert planned_jobs(changed) == {}
    jobs = planned_jobs(changed, "reproduce_extras")
    assert set(jobs) == {"evaluators", "reproduce_extras"}, jobs


@pytest.mark.parametrize("changes", [
    {"resources": {"train": {"mem_mb": 9999, "runtime": 600, "data_workers": 2},
                   "light": {"mem_mb": 123}}},
    {"threads": 2},
    {"cd": {"ckpt_every": 7}},
    {"cd": {"batch_gpu": 8}},  # micro-batches: the same update up to rounding
])
def test_resources_threads_and_resume_cadence_rerun_nothing(edited, changes):
    write, out = edited
    assert planned_jobs(write(**changes)) == {}


def test_cd_edit_reruns_cd_and_its_downstream_only(edited):
    write, out = edited
    jobs = planned_jobs(write(cd={"iters": 5}))
    assert set(jobs) == {"train", "search_tau", "sample", "evaluate", "table1", "figure4",
                         "reproduce_table"}, jobs
    trained = [o for outputs in jobs["train"] for o in outputs]
    assert trained and all("/runs/cd/" in o for o in trained), trained
    assert jobs["search_tau"] == [[f"{out}/taus/cd.json"]]
    for rule in ("sample", "evaluate"):
        for outputs in jobs[rule]:
            assert all(re.search(r"/(samples|metrics|plots)/(cd/|samples_cd_)", o)
                       for o in outputs), outputs
    assert not any("teacher" in o for outputs in jobs["train"] for o in outputs)


# ----------------------------------------------------------------------------------------------
# Released models added to the tiny run's results and scored beside the paper's Table 2.


def test_evaluate_published_scores_the_release_beside_the_paper(edited, tmp_path):
    write, out = edited
    # Named like the released ImageNet 64 file: the table puts the paper's 6.20 beside it.
    openai_release(tmp_path, "cd_imagenet64_lpips.pt")
    config = write(published={"cd_lpips": {"path": str(tmp_path / "cd_imagenet64_lpips.pt"),
                                           "method": "cd",
                                           "arch_config": str(tmp_path / "adm.yaml"),
                                           "taus": [0.5, 0.1]}})
    # Listing a released model reruns nothing of Table 1; scoring it reuses the run's data,
    # classifier and reference statistics.
    assert planned_jobs(config) == {}
    jobs = planned_jobs(config, "evaluate_published")
    assert set(jobs) == {"convert_published", "sample", "evaluate", "table2_published",
                         "evaluate_published"}, jobs
    r = snakemake("evaluate_published", "--cores", "2", "--configfile", config)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "tables" / "table2_published.md").read_text()
    for steps, paper in ((1, "6.20"), (2, "4.70")):
        record = json.loads((out / "metrics" / "published_cd_lpips" / f"steps{steps}.json")
                            .read_text())
        assert record["source"] == "cd_imagenet64_lpips.pt" and math.isfinite(record["fid"])
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
                if line.startswith("| cd_imagenet64_lpips.pt")]
        row = next(r for r in rows if r[2] == str(steps))  # model, method, steps, taus, ...
        assert row[4:6] == [f"{record['fid']:.2f}", paper], (row, md)
    # The 2-step sample used the model's own tau (the paper's choice), not a search.
    meta = json.loads((out / "samples" / "published_cd_lpips" / "steps2.json").read_text())
    assert meta["taus"] == [0.5] and meta["tau_source"] == "published.cd_lpips.taus"
    assert not list((out / "taus").glob("published*"))


# ----------------------------------------------------------------------------------------------
# The Snakemake HTML report of the tiny run, in headless Chromium.

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = pytest.mark.skipif(
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


@NO_BROWSER
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
