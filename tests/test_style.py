"""House style is part of the build: ruff and snakefmt report nothing."""

from conftest import ROOT, run


def test_ruff_is_clean():
    r = run(["ruff", "check", "cmcore", "tests"], cwd=ROOT)
    assert r.returncode == 0, r.stdout


def test_snakefmt_is_clean():
    r = run(["snakefmt", "--check", "Snakefile", "workflow/rules"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
