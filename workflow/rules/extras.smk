# Beyond the paper: iCT, ECT and continuous-time CD / CT (trained by rule train), for the
# reproduce_extras target only (they would push reproduce_table past its time goal).


rule table_extended:
    input:
        metrics=[
            f"{OUT}/metrics/{m}/steps{n}.json" for m, n in TABLE1_RUNS + EXTRA_RUNS
        ],
    output:
        csv=f"{OUT}/tables/table1_extended.csv",
        md=f"{OUT}/tables/table1_extended.md",
        html=report(
            f"{OUT}/tables/table1_extended.html",
            caption="../report/table1_extended.rst",
            category="Table 1",
            labels={"table": "with later recipes"},
        ),
        plot=report(
            f"{OUT}/plots/fid_vs_compute.png",
            caption="../report/fid_vs_compute.rst",
            category="Table 1",
            labels={"figure": "FID against training compute"},
        ),
    log:
        f"{OUT}/logs/table_extended.log",
    benchmark:
        f"{OUT}/benchmarks/table_extended.tsv"
    conda:
        ENV
    resources:
        **res("light"),
    params:
        config=RESOLVED,
        settings=settings("table"),
    shell:
        "cm table --config {params.config:q} --metrics {input.metrics:q} --out {output.csv:q}"
        " --md {output.md:q} --html {output.html:q} --compute-plot {output.plot:q}"
        " > {log:q} 2>&1"


# Table 1's samples scored by torch-fidelity and clean-fid side by side (FD-DINOv2 too when
# evaluation.dinov2_weights is set): the differences between evaluators, measured.
rule evaluators:
    input:
        samples=[f"{OUT}/samples/{m}/steps{n}.npz" for m, n in TABLE1_RUNS],
        meta=[f"{OUT}/samples/{m}/steps{n}.json" for m, n in TABLE1_RUNS],
        reference=DATA,
        reference_batch=reference_batch,
        extractor=extractor_weights,
        peers=evaluator_weights,
    output:
        csv=f"{OUT}/tables/evaluators.csv",
        md=f"{OUT}/tables/evaluators.md",
        html=report(
            f"{OUT}/tables/evaluators.html",
            caption="../report/evaluators.rst",
            category="Table 1",
            labels={"table": "evaluators side by side"},
        ),
    log:
        f"{OUT}/logs/evaluators.log",
    benchmark:
        f"{OUT}/benchmarks/evaluators.tsv"
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("evaluate"),
    params:
        config=RESOLVED,
        settings=settings("evaluators"),
        classifier=flag("classifier", "extractor"),
        batch=flag("reference-batch", "reference_batch"),
    shell:
        "cm evaluators --config {params.config:q} --samples {input.samples:q}"
        " --meta {input.meta:q}"
        " --reference {input.reference:q} {params.batch} {params.classifier}"
        " --out {output.csv:q} --md {output.md:q} --html {output.html:q} --threads {threads}"
        " > {log:q} 2>&1"


rule edit:
    input:
        checkpoint=f"{OUT}/runs/{CFG['editing']['method']}/checkpoint.pt",
        data=DATA,
    output:
        report(
            f"{OUT}/plots/edit_{{task}}.png",
            caption="../report/edit.rst",
            category="Zero-shot editing",
            labels={"task": "{task}"},
        ),
    log:
        f"{OUT}/logs/edit_{{task}}.log",
    benchmark:
        f"{OUT}/benchmarks/edit_{{task}}.tsv"
    wildcard_constraints:
        task=r"[a-z]+",
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("sample"),
    params:
        config=RESOLVED,
        settings=settings("edit"),
    shell:
        "cm edit --config {params.config:q} --checkpoint {input.checkpoint:q}"
        " --data {input.data:q} --task {wildcards.task} --out {output:q} --threads {threads}"
        " > {log:q} 2>&1"


rule edits:
    input:
        [f"{OUT}/plots/edit_{t}.png" for t in CFG["editing"]["tasks"]],


rule reproduce_extras:
    input:
        rules.table_extended.output,
        rules.evaluators.output,
        [f"{OUT}/plots/samples_{m}_{n}step.png" for m, n in EXTRA_RUNS],
        rules.edits.input,
