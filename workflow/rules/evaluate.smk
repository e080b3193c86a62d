rule evaluate:
    input:
        samples=rules.sample.output.samples,
        meta=rules.sample.output.meta,
        reference=DATA,
        reference_batch=reference_batch,
        extractor=extractor_weights,
    output:
        f"{OUT}/metrics/{{method}}/steps{{steps}}.json",
    log:
        f"{OUT}/logs/evaluate_{{method}}_{{steps}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_{{method}}_{{steps}}.tsv"
    priority: CHAIN_PRIORITY
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("evaluate"),
    params:
        config=RESOLVED,
        settings=settings("evaluate"),
        classifier=flag("classifier", "extractor"),
        batch=flag("reference-batch", "reference_batch"),
    shell:
        "cm evaluate --config {params.config:q} --samples {input.samples:q}"
        " --meta {input.meta:q} --reference {input.reference:q} {params.batch}"
        " {params.classifier}"
        " --out {output:q} --threads {threads} > {log:q} 2>&1"
