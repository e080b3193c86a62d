rule prepare_data:
    output:
        DATA,
    log:
        f"{OUT}/logs/prepare_data.log",
    benchmark:
        f"{OUT}/benchmarks/prepare_data.tsv"
    conda:
        ENV
    resources:
        **res("light"),
    params:
        config=RESOLVED,
        settings=settings("prepare-data"),
    shell:
        "cm prepare-data --config {params.config:q} --out {output:q} > {log:q} 2>&1"


rule train_classifier:
    input:
        data=DATA,
    output:
        CLASSIFIER,
    log:
        f"{OUT}/logs/train_classifier.log",
    benchmark:
        f"{OUT}/benchmarks/train_classifier.tsv"
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("light"),
    params:
        config=RESOLVED,
        settings=settings("train-classifier"),
    shell:
        "cm train-classifier --config {params.config:q} --data {input.data:q} --out {output:q}"
        " --threads {threads} > {log:q} 2>&1"
