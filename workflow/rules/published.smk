# The released consistency models of openai/consistency_models (config `published`), converted,
# sampled with the paper's taus (sampling.tau, never searched) and scored like Table 1's rows:
# `snakemake evaluate_published --configfile ...` checks the paper's Table 2 in GPU-minutes.


rule convert_published:
    input:
        lambda wildcards: PUBLISHED[wildcards.method]["path"],
    output:
        f"{OUT}/runs/{{method}}/checkpoint.pt",
    log:
        f"{OUT}/logs/convert_{{method}}.log",
    benchmark:
        f"{OUT}/benchmarks/convert_{{method}}.tsv"
    wildcard_constraints:
        method="|".join(PUBLISHED) or "^$",
    conda:
        ENV
    resources:
        **res("light"),
    params:
        config=RESOLVED,
        settings=settings("convert", method=str),
        kind=lambda wildcards: PUBLISHED[wildcards.method]["method"],
        arch=lambda wildcards: PUBLISHED[wildcards.method]["arch_config"],
        name=lambda wildcards: wildcards.method[len(dag.PUBLISHED) :],
    shell:
        "cm convert --openai {input:q} --method {params.kind} --arch-config {params.arch:q}"
        " --name {params.name} --config {params.config:q} --out {output:q} > {log:q} 2>&1"


rule table2_published:
    input:
        metrics=published_metrics,
    output:
        csv=f"{OUT}/tables/table2_published.csv",
        md=f"{OUT}/tables/table2_published.md",
        html=report(
            f"{OUT}/tables/table2_published.html",
            caption="../report/table2_published.rst",
            category="Table 2",
            labels={"table": "released models"},
        ),
    log:
        f"{OUT}/logs/table2_published.log",
    benchmark:
        f"{OUT}/benchmarks/table2_published.tsv"
    conda:
        ENV
    resources:
        **res("light"),
    params:
        config=RESOLVED,
        settings=settings("table"),
    shell:
        "cm table --config {params.config:q} --metrics {input.metrics:q} --out {output.csv:q}"
        " --md {output.md:q} --html {output.html:q} --published > {log:q} 2>&1"


rule evaluate_published:
    input:
        rules.table2_published.output,
