rule table1:
    input:
        cfg=RESOLVED,
        metrics=[f"{OUT}/metrics/{m}/steps{n}.json" for m, n in RUNS],
    output:
        csv=f"{OUT}/tables/table1.csv",
        md=f"{OUT}/tables/table1.md",
    log:
        f"{OUT}/logs/table1.log",
    benchmark:
        f"{OUT}/benchmarks/table1.tsv"
    conda:
        ENV
    resources:
        **res("light"),
    shell:
        "cm table --config {input.cfg} --metrics {input.metrics} --out {output.csv}"
        " > {log} 2>&1"


rule reproduce_table:
    input:
        rules.table1.output,
        [f"{OUT}/plots/samples_{m}_{n}step.png" for m, n in RUNS],
