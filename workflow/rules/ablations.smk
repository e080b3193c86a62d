# The paper's Fig. 3 ablations (cmcore/ablations.py): one job per run and seed trains and scores
# its EMA snapshots; one job writes the panels' tables and plots.
rule ablate:
    input:
        cfg=RESOLVED,
        data=DATA,
        teacher=ablation_teacher,
        extractor=extractor_weights,
    output:
        scores=f"{OUT}/ablations/{{run}}/seed{{seed}}/scores.csv",
        checkpoint=f"{OUT}/ablations/{{run}}/seed{{seed}}/checkpoint.pt",
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
        **res("train"),
    params:
        teacher=lambda wildcards, input: (
            f"--teacher {input.teacher}" if input.teacher else ""
        ),
        classifier=lambda wildcards, input: (
            f"--classifier {input.extractor}" if input.extractor else ""
        ),
    shell:
        "cm ablate --config {input.cfg} --run {wildcards.run} --seed {wildcards.seed}"
        " --data {input.data} {params.teacher} {params.classifier} --out {output.scores}"
        " --threads {threads} > {log} 2>&1"


rule ablation_report:
    input:
        cfg=RESOLVED,
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
        tables=lambda wildcards, output: os.path.dirname(output.tables[0]),
        plots=lambda wildcards, output: os.path.dirname(output.plots[0]),
    shell:
        "cm ablation-report --config {input.cfg} --scores {input.scores}"
        " --out {params.tables} --plots {params.plots} > {log} 2>&1"
