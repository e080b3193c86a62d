rule table1:
    input:
        metrics=[f"{OUT}/metrics/{m}/steps{n}.json" for m, n in TABLE1_RUNS],
    output:
        csv=f"{OUT}/tables/table1.csv",
        md=f"{OUT}/tables/table1.md",
        html=report(
            f"{OUT}/tables/table1.html",
            caption="../report/table1.rst",
            category="Table 1",
            labels={"table": "ours"},
        ),
        paper_md=f"{OUT}/tables/table1_paper.md",
        paper_html=report(
            f"{OUT}/tables/table1_paper.html",
            caption="../report/table1_paper.rst",
            category="Table 1",
            labels={"table": "beside the paper's"},
        ),
    log:
        f"{OUT}/logs/table1.log",
    benchmark:
        f"{OUT}/benchmarks/table1.tsv"
    conda:
        ENV
    resources:
        **res("light"),
    params:
        config=RESOLVED,
        settings=settings("table"),
    shell:
        "cm table --config {params.config:q} --metrics {input.metrics:q} --out {output.csv:q}"
        " --md {output.md:q} --html {output.html:q} --paper-md {output.paper_md:q}"
        " --paper-html {output.paper_html:q} > {log:q} 2>&1"


rule theorem1:
    output:
        orders=report(
            f"{OUT}/theorem1/orders.csv",
            caption="../report/theorem1.rst",
            category="Theorem 1",
            labels={"figure": "slopes"},
        ),
        errors=f"{OUT}/theorem1/errors.csv",
        gap=f"{OUT}/theorem1/ct_cd_gap.csv",
        plot=report(
            f"{OUT}/theorem1/orders.png",
            caption="../report/theorem1.rst",
            category="Theorem 1",
            labels={"figure": "errors against N"},
        ),
        gap_plot=f"{OUT}/theorem1/ct_cd_gap.png",
        summary=f"{OUT}/theorem1/summary.json",
    log:
        f"{OUT}/logs/theorem1.log",
    benchmark:
        f"{OUT}/benchmarks/theorem1.tsv"
    conda:
        ENV
    threads: 1
    resources:
        **res("light"),
    params:
        config=RESOLVED,
        settings=settings("theorem1"),
        out=lambda wildcards, output: os.path.dirname(output.orders),
    shell:
        "cm theorem1 --config {params.config:q} --out {params.out:q} --threads {threads}"
        " > {log:q} 2>&1"


rule figure4:
    input:
        metrics=[f"{OUT}/metrics/{m}/steps{n}.json" for m, n in CURVE_RUNS],
    output:
        csv=f"{OUT}/tables/fig4_steps.csv",
        md=f"{OUT}/tables/fig4_steps.md",
        html=report(
            f"{OUT}/tables/fig4_steps.html",
            caption="../report/fig4.rst",
            category="Fig. 4",
            labels={"figure": "table"},
        ),
        plot=report(
            f"{OUT}/plots/fig4_steps.png",
            caption="../report/fig4.rst",
            category="Fig. 4",
            labels={"figure": "plot"},
        ),
    log:
        f"{OUT}/logs/figure4.log",
    benchmark:
        f"{OUT}/benchmarks/figure4.tsv"
    conda:
        ENV
    resources:
        **res("light"),
    params:
        config=RESOLVED,
        settings=settings("figure4"),
    shell:
        "cm figure4 --config {params.config:q} --metrics {input.metrics:q} --out {output.csv:q}"
        " --md {output.md:q} --html {output.html:q} --plot {output.plot:q} > {log:q} 2>&1"


rule reproduce_table:
    input:
        rules.table1.output,
        [f"{OUT}/plots/samples_{m}_{n}step.png" for m, n in RUNS],
        rules.theorem1.output if CFG["theorem1"]["enabled"] else [],
        rules.figure4.output if CFG["sampling"]["curve_steps"] else [],
        rules.ablation_report.output if ABLATION_PANELS else [],
