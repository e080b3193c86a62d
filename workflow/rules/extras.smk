# Beyond the paper: iCT, ECT and continuous-time CD / CT, trained for the
# reproduce_extras target only (they would push reproduce_table past its time goal).


rule train_extra:
    input:
        cfg=RESOLVED,
        data=DATA,
        teacher=extra_teacher,
    output:
        ckpt=f"{OUT}/runs/{{method}}/checkpoint.pt",
        loss=report(
            f"{OUT}/runs/{{method}}/loss.png",
            caption="../report/loss.rst",
            category="Training",
            labels={"method": "{method}", "figure": "loss"},
        ),
    log:
        f"{OUT}/logs/train_{{method}}.log",
    benchmark:
        f"{OUT}/benchmarks/train_{{method}}.tsv"
    wildcard_constraints:
        method="|".join(EXTRA_METHODS) or "no-extra-method",
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("train"),
    params:
        cm=TRAIN_CM,
        teacher=lambda wildcards, input: (
            f"--teacher {input.teacher}" if input.teacher else ""
        ),
    shell:
        "{params.cm} train --method {wildcards.method} --config {input.cfg}"
        " --data {input.data}"
        " {params.teacher} --out {output.ckpt} --threads {threads} > {log} 2>&1"


rule table_extended:
    input:
        cfg=RESOLVED,
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
    log:
        f"{OUT}/logs/table_extended.log",
    benchmark:
        f"{OUT}/benchmarks/table_extended.tsv"
    conda:
        ENV
    resources:
        **res("light"),
    shell:
        "cm table --config {input.cfg} --metrics {input.metrics} --out {output.csv}"
        " > {log} 2>&1"


rule edit:
    input:
        cfg=RESOLVED,
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
    shell:
        "cm edit --config {input.cfg} --checkpoint {input.checkpoint} --data {input.data}"
        " --task {wildcards.task} --out {output} --threads {threads} > {log} 2>&1"


rule edits:
    input:
        [f"{OUT}/plots/edit_{t}.png" for t in CFG["editing"]["tasks"]],


rule reproduce_extras:
    input:
        rules.table_extended.output,
        [f"{OUT}/plots/samples_{m}_{n}step.png" for m, n in EXTRA_RUNS],
        rules.edits.input,
