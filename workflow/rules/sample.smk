rule search_tau:
    input:
        checkpoint=f"{OUT}/runs/{{method}}/checkpoint.pt",
        data=DATA,
        extractor=extractor_weights,
    output:
        f"{OUT}/taus/{{method}}.json",
    log:
        f"{OUT}/logs/search_tau_{{method}}.log",
    benchmark:
        f"{OUT}/benchmarks/search_tau_{{method}}.tsv"
    priority: CHAIN_PRIORITY
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("sample"),
    params:
        config=RESOLVED,
        settings=settings("search-tau", method=str),
        classifier=flag("classifier", "extractor"),
    shell:
        "cm search-tau --config {params.config:q} --checkpoint {input.checkpoint:q}"
        " --data {input.data:q} {params.classifier} --out {output:q} --threads {threads}"
        " > {log:q} 2>&1"


rule sample:
    input:
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
    priority: CHAIN_PRIORITY
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("sample"),
    params:
        config=RESOLVED,
        settings=settings("sample", method=str, steps=int),
        taus=flag("taus", "taus"),
    shell:
        "cm sample --config {params.config:q} --checkpoint {input.checkpoint:q}"
        " --steps {wildcards.steps} {params.taus} --out {output.samples:q}"
        " --meta {output.meta:q} --grid {output.grid:q} --threads {threads} > {log:q} 2>&1"
