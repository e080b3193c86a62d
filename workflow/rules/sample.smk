rule search_tau:
    input:
        cfg=RESOLVED,
        checkpoint=f"{OUT}/runs/{{method}}/checkpoint.pt",
        data=DATA,
        extractor=extractor_weights,
    output:
        f"{OUT}/taus/{{method}}.json",
    log:
        f"{OUT}/logs/search_tau_{{method}}.log",
    benchmark:
        f"{OUT}/benchmarks/search_tau_{{method}}.tsv"
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("sample"),
    params:
        classifier=lambda wildcards, input: (
            f"--classifier {input.extractor}" if input.extractor else ""
        ),
    shell:
        "cm search-tau --config {input.cfg} --checkpoint {input.checkpoint}"
        " --data {input.data} {params.classifier} --out {output} --threads {threads}"
        " > {log} 2>&1"


rule sample:
    input:
        cfg=RESOLVED,
        checkpoint=f"{OUT}/runs/{{method}}/checkpoint.pt",
        taus=searched_taus,
    output:
        samples=f"{OUT}/samples/{{method}}/steps{{steps}}.npz",
        meta=f"{OUT}/samples/{{method}}/steps{{steps}}.json",
        grid=report(
            f"{OUT}/plots/samples_{{method}}_{{steps}}step.png",
            caption="../report/samples.rst",
            category="Samples",
            labels={"method": "{method}", "steps": "{steps}"},
        ),
    log:
        f"{OUT}/logs/sample_{{method}}_{{steps}}.log",
    benchmark:
        f"{OUT}/benchmarks/sample_{{method}}_{{steps}}.tsv"
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("sample"),
    params:
        taus=lambda wildcards, input: f"--taus {input.taus}" if input.taus else "",
    shell:
        "cm sample --config {input.cfg} --checkpoint {input.checkpoint} --steps {wildcards.steps}"
        " --out {output.samples} --grid {output.grid} {params.taus} --threads {threads}"
        " > {log} 2>&1"
