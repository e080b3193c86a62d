"""The Snakemake DAG: dry run and lint are clean, bad configs stop before any job, and the real
DAG runs end to end on a tiny config and writes a table of finite numbers."""

import re
import sys

import pytest
from conftest import ROOT, snakemake, tiny_config

from cmcore.cli import torchrun_command

RULES = ["prepare_data", "train_classifier", "train", "untrained", "search_tau", "sample",
         "evaluate", "ablate", "ablation_report", "table1", "theorem1", "figure4"]


def test_dry_run_of_the_default_config_lists_every_rule():
    # --forceall: the whole DAG, whatever a `make reproduce` in this checkout left in results/
    r = snakemake("-n", "--forceall", "reproduce_table")
    assert r.returncode == 0, r.stderr
    for rule in RULES:
        assert f"\n{rule} " in r.stdout, rule


def test_lint_is_clean():
    r = snakemake("--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Lints for" not in r.stdout + r.stderr


@pytest.mark.parametrize("change, words", [
    ({"cd": {"N": 0}}, "cd.N: 0 is less than the minimum of 2"),
    ({"ct": {"s0": 10, "s1": 5}}, "ct.s1 = 5 must be greater than ct.s0 = 10"),
    ({"ct": {"distance": "l3"}}, "ct.distance: 'l3' is not one of"),
    ({"pd": {"warmups": 3}}, "pd.warmups: unknown key"),
    ({"dataset": {"name": "cifar10", "path": "/no/such/cifar-10-python.tar.gz"},
      "evaluation": {"feature_extractor": "inception"}}, "/no/such/cifar-10-python.tar.gz"),
])
def test_bad_config_stops_before_any_job(tmp_path, change, words):
    r = snakemake("--cores", "1", "--configfile", tiny_config(tmp_path, **change))
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert words in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [
        f"config error: {err.split('config error: ')[1].splitlines()[0]}"]
    assert not (tmp_path / "results").exists()


def test_root_snakefile_is_where_the_readme_says():
    assert (ROOT / "Snakefile").is_file()
    assert (ROOT / "workflow/schemas/config.schema.yaml").is_file()


def test_training_with_several_gpus_launches_torchrun(tmp_path):
    config = tiny_config(tmp_path, resources={"train": {"gpu": 4}})
    r = snakemake("reproduce_table", "-n", "-p", "--configfile", config)
    assert r.returncode == 0, r.stderr[-2000:]
    commands = [line.strip().removeprefix("Shell command: ") for line in r.stdout.splitlines()
                if " train --method " in line]
    assert {c.split(" train --method ")[1].split()[0] for c in commands} == {
        "teacher", "cd", "ct", "pd", "untrained"}
    for c in commands:  # cm train --gpus N reruns itself under torchrun (cmcore.cli)
        assert ("--gpus" not in c) if "--method untrained" in c else c.endswith(
            "--gpus 4 --threads 1 > " + c.split(" > ")[1]), c
    argv = ["train", "--method", "cd", "--gpus", "4"]
    assert torchrun_command(argv, 4) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "cmcore", *argv]


def test_shown_commands_put_the_target_before_configfile():
    # --configfile takes several values: a target after it would be read as a config file.
    shown = [ROOT / "README.md", ROOT / "slurm" / "config.yaml", ROOT / ".test/config/config.yaml",
             *sorted((ROOT / "config").glob("*.yaml"))]
    commands = [c for path in shown for c in re.findall(r"snakemake [^`\n]*", path.read_text())]
    assert len(commands) >= 8
    for command in commands:
        tokens = command.split()
        if "--configfile" in tokens:
            after = tokens[tokens.index("--configfile") + 1:]
            values = after[: next((i for i, t in enumerate(after) if t.startswith("-")),
                                  len(after))]
            assert values and all(v.endswith(".yaml") for v in values), command


def _documented_commands():
    """Every `snakemake ...` command of the README, the profile and the configs, as written
    (a trailing shell comment dropped); --report commands need finished results: left out."""
    shown = [ROOT / "README.md", ROOT / "slurm" / "config.yaml",
             *sorted((ROOT / "config").glob("*.yaml"))]
    commands = {c.split(" #")[0].strip() for path in shown
                for c in re.findall(r"snakemake [^`\n]*", path.read_text())}
    return sorted(c for c in commands if "--report" not in c)


def test_documented_commands_plan_their_dag(tmp_path, lpips_hub):
    # In a copy of the repository's layout holding the files the paper configs name (empty
    # stand-ins: a dry run reads none), each command runs as written, plus -n: through the
    # shipped slurm profile where it says so. A wrong form (a target after --configfile) or a
    # config the workflow refuses fails here.
    for name in ("Snakefile", "workflow", "slurm"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "config").symlink_to(ROOT / "config")
    data = tmp_path / "data"
    for folder in ("imagenet/train", "lsun/bedroom_train", "lsun/cat_train"):
        (data / folder).mkdir(parents=True)
    for file in ("cifar-10-python.tar.gz", "weights-inception-2015-12-05-6726825d.pth",
                 "cifar10-32x32.npz", "VIRTUAL_imagenet64_labeled.npz",
                 "VIRTUAL_lsun_bedroom256.npz", "VIRTUAL_lsun_cat256.npz",
                 *(f"{m}_{d}{v}.pt" for m, v in (("cd", "_lpips"), ("cd", "_l2"), ("ct", ""))
                   for d in ("imagenet64", "bedroom256", "cat256"))):
        (data / file).write_bytes(b"")
    commands = _documented_commands()
    assert any("--profile slurm" in c for c in commands) and len(commands) >= 5, commands
    for command in commands:
        argv = [t for t in command.split() if not t.startswith("PATH=")][1:]
        r = snakemake(*argv, "-n", cwd=tmp_path)
        assert r.returncode == 0, f"{command}\n{r.stdout[-1500:]}{r.stderr[-1500:]}"
        assert "Traceback" not in r.stderr and "Job stats" in r.stdout, command
