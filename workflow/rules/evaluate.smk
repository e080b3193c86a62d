rule evaluate:
    input:
        cfg=RESOLVED,
        samples=rules.sample.output.samples,
        meta=rules.sample.output.meta,
        reference=DATA,
        extractor=extractor_weights,
    output:
        f"{OUT}/metrics/{{method}}/steps{{steps}}.json",
    log:
        f"{OUT}/logs/evaluate_{{method}}_{{steps}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_{{method}}_{{steps}}.tsv"
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("evaluate"),
    params:
        classifier=lambda wildcards, input: (
            f"--classifier {input.extractor}" if input.extractor else ""
        ),
    shell:
        "cm evaluate --config {input.cfg} --samples {input.samples}"
        " --reference {input.reference} {params.classifier} --out {output}"
        " --threads {threads} > {log} 2>&1"
