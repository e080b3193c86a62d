rule sample:
    input:
        cfg=RESOLVED,
        checkpoint=f"{OUT}/runs/{{method}}/checkpoint.pt",
    output:
        samples=f"{OUT}/samples/{{method}}/steps{{steps}}.npz",
        meta=f"{OUT}/samples/{{method}}/steps{{steps}}.json",
        grid=f"{OUT}/plots/samples_{{method}}_{{steps}}step.png",
    log:
        f"{OUT}/logs/sample_{{method}}_{{steps}}.log",
    benchmark:
        f"{OUT}/benchmarks/sample_{{method}}_{{steps}}.tsv"
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("sample"),
    shell:
        "cm sample --config {input.cfg} --checkpoint {input.checkpoint} --steps {wildcards.steps}"
        " --out {output.samples} --grid {output.grid} --threads {threads} > {log} 2>&1"
