# Training: one rule over {method} for the teacher, CD, CT, PD and the later recipes (the
# teacher checkpoint is an input for the methods that start from it), and the untrained
# baseline, which is an initialisation rather than a training run.
TRAINED = [m for m in METHODS if m != "untrained"]


rule train:
    input:
        data=DATA,
        teacher=teacher_of,
    output:
        ckpt=f"{OUT}/runs/{{method}}/checkpoint.pt",
        train_log=f"{OUT}/runs/{{method}}/train_log.csv",
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
        method="|".join(TRAINED),
    priority: train_priority
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("train"),
    params:
        config=RESOLVED,
        settings=settings("train", method=str),
        teacher=flag("teacher", "teacher"),
    shell:
        "cm train --method {wildcards.method} --config {params.config:q} --data {input.data:q}"
        " {params.teacher} --out {output.ckpt:q} --train-log {output.train_log:q}"
        " --loss-plot {output.loss:q} --gpus {resources.gpu} --threads {threads}"
        " > {log:q} 2>&1"


rule untrained:
    input:
        data=DATA,
    output:
        f"{OUT}/runs/untrained/checkpoint.pt",
    log:
        f"{OUT}/logs/train_untrained.log",
    benchmark:
        f"{OUT}/benchmarks/train_untrained.tsv"
    conda:
        ENV
    resources:
        **res("light"),
    params:
        config=RESOLVED,
        settings=settings("train", method="untrained"),
    shell:
        "cm train --method untrained --config {params.config:q} --data {input.data:q}"
        " --out {output:q} > {log:q} 2>&1"
