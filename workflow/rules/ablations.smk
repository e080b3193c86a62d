# The paper's Fig. 3 ablations (cmcore.experiments.ablations): one job per run and seed trains
# and scores its EMA snapshots; one job writes the panels' tables and plots.
rule ablate:
    input:
        data=DATA,
        teacher=ablation_teacher,
        extractor=extractor_weights,
    output:
        scores=f"{OUT}/ablations/{{run}}/seed{{seed}}/scores.csv",
        checkpoint=f"{OUT}/ablations/{{run}}/seed{{seed}}/checkpoint.pt",
        train_log=f"{OUT}/ablations/{{run}}/seed{{seed}}/train_log.csv",
    log:
        f"{OUT}/logs/ablate_{{run}}_seed{{seed}}.log",
    benchmark:
        f"{OUT}/benchmarks/ablate_{{run}}_seed{{seed}}.tsv"
    wildcard_constraints:
        run=r"(cd|ct)-[A-Za-z0-9_.-]+|ict",
        seed=r"\d+",
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("train", one_node=True),
    params:
        config=RESOLVED,
        settings=settings("ablate", run=str, seed=int),
        teacher=flag("teacher", "teacher"),
        classifier=flag("classifier", "extractor"),
    shell:
        "cm ablate --config {params.config:q} --run {wildcards.run} --seed {wildcards.seed}"
        " --data {input.data:q} {params.teacher} {params.classifier}"
        " --checkpoint {output.checkpoint:q} --train-log {output.train_log:q}"
        " --out {output.scores:q} --threads {threads} > {log:q} 2>&1"


rule ablation_report:
    input:
        scores=ABLATION_SCORES,
    output:
        tables=[
            report(
                f"{OUT}/tables/fig3{p}.html",
                caption="../report/fig3.rst",
                category="Fig. 3 ablations",
                labels={"panel": p, "figure": "table"},
            )
            for p in ABLATION_PANELS
        ]
        + [
            f"{OUT}/tables/fig3{p}.{ext}"
            for p in ABLATION_PANELS
            for ext in ("csv", "md")
        ],
        plots=[
            report(
                f"{OUT}/plots/fig3{p}.png",
                caption="../report/fig3.rst",
                category="Fig. 3 ablations",
                labels={"panel": p, "figure": "plot"},
            )
            for p in ABLATION_PANELS
        ],
    log:
        f"{OUT}/logs/ablation_report.log",
    benchmark:
        f"{OUT}/benchmarks/ablation_report.tsv"
    conda:
        ENV
    resources:
        **res("light"),
    params:
        config=RESOLVED,
        settings=settings("ablation-report"),
        tables=lambda wildcards, output: os.path.dirname(output.tables[0]),
        plots=lambda wildcards, output: os.path.dirname(output.plots[0]),
    shell:
        "cm ablation-report --config {params.config:q} --scores {input.scores:q}"
        " --out {params.tables:q} --plots {params.plots:q} > {log:q} 2>&1"
