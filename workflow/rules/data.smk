rule resolved_config:
    output:
        RESOLVED,
    log:
        f"{OUT}/logs/resolved_config.log",
    conda:
        ENV
    params:
        cfg=CFG,
    run:
        from cmcore.config import write_resolved

        write_resolved(params.cfg, output[0])


rule prepare_data:
    input:
        cfg=RESOLVED,
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
    shell:
        "cm prepare-data --config {input.cfg} --out {output} > {log} 2>&1"


rule train_classifier:
    input:
        cfg=RESOLVED,
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
    shell:
        "cm train-classifier --config {input.cfg} --data {input.data} --out {output}"
        " --threads {threads} > {log} 2>&1"
