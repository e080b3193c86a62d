# Consistency Models (Song et al., 2023) as a Snakemake DAG. See README.md.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless --configfile names a complete config of its own (a config file is
# never merged over this one: a cluster run must not inherit the laptop's grids).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/ablations.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/extras.smk"
include: "workflow/rules/published.smk"


# `snakemake` alone builds reproduce_table, the main target (what `make reproduce` runs).
rule all:
    default_target: True
    input:
        rules.reproduce_table.input,
