def train_rule_io(method):
    return dict(
        output=f"{OUT}/runs/{method}/checkpoint.pt",
        log=f"{OUT}/logs/train_{method}.log",
        benchmark=f"{OUT}/benchmarks/train_{method}.tsv",
    )


rule train_teacher:
    input:
        cfg=RESOLVED,
        data=DATA,
    output:
        train_rule_io("teacher")["output"],
    log:
        train_rule_io("teacher")["log"],
    benchmark:
        train_rule_io("teacher")["benchmark"]
    threads: CFG["threads"]
    resources:
        **res("train"),
    shell:
        "{CM} train --method teacher --config {input.cfg} --data {input.data} --out {output}"
        " --threads {threads} > {log} 2>&1"


rule train_cd:
    input:
        cfg=RESOLVED,
        data=DATA,
        teacher=rules.train_teacher.output[0],
    output:
        train_rule_io("cd")["output"],
    log:
        train_rule_io("cd")["log"],
    benchmark:
        train_rule_io("cd")["benchmark"]
    threads: CFG["threads"]
    resources:
        **res("train"),
    shell:
        "{CM} train --method cd --config {input.cfg} --data {input.data}"
        " --teacher {input.teacher} --out {output} --threads {threads} > {log} 2>&1"


rule train_ct:
    input:
        cfg=RESOLVED,
        data=DATA,
    output:
        train_rule_io("ct")["output"],
    log:
        train_rule_io("ct")["log"],
    benchmark:
        train_rule_io("ct")["benchmark"]
    threads: CFG["threads"]
    resources:
        **res("train"),
    shell:
        "{CM} train --method ct --config {input.cfg} --data {input.data} --out {output}"
        " --threads {threads} > {log} 2>&1"


rule train_pd:
    input:
        cfg=RESOLVED,
        data=DATA,
        teacher=rules.train_teacher.output[0],
    output:
        train_rule_io("pd")["output"],
    log:
        train_rule_io("pd")["log"],
    benchmark:
        train_rule_io("pd")["benchmark"]
    threads: CFG["threads"]
    resources:
        **res("train"),
    shell:
        "{CM} train --method pd --config {input.cfg} --data {input.data}"
        " --teacher {input.teacher} --out {output} --threads {threads} > {log} 2>&1"


rule train_untrained:
    input:
        cfg=RESOLVED,
        data=DATA,
    output:
        train_rule_io("untrained")["output"],
    log:
        train_rule_io("untrained")["log"],
    benchmark:
        train_rule_io("untrained")["benchmark"]
    resources:
        **res("light"),
    shell:
        "{CM} train --method untrained --config {input.cfg} --data {input.data} --out {output}"
        " > {log} 2>&1"
