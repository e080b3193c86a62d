rule train_teacher:
    input:
        cfg=RESOLVED,
        data=DATA,
        pretrained=(
            [CFG["teacher"]["pretrained"]] if CFG["teacher"]["pretrained"] else []
        ),
    output:
        ckpt=train_rule_io("teacher")["output"],
        loss=train_loss_plot("teacher"),
    log:
        train_rule_io("teacher")["log"],
    benchmark:
        train_rule_io("teacher")["benchmark"]
    priority: 2
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("train"),
    params:
        cm=TRAIN_CM,
    shell:
        "{params.cm} train --method teacher --config {input.cfg} --data {input.data}"
        " --out {output.ckpt}"
        " --threads {threads} > {log} 2>&1"


rule train_cd:
    input:
        cfg=RESOLVED,
        data=DATA,
        teacher=rules.train_teacher.output[0],
    output:
        ckpt=train_rule_io("cd")["output"],
        loss=train_loss_plot("cd"),
    log:
        train_rule_io("cd")["log"],
    benchmark:
        train_rule_io("cd")["benchmark"]
    priority: 1
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("train"),
    params:
        cm=TRAIN_CM,
    shell:
        "{params.cm} train --method cd --config {input.cfg} --data {input.data}"
        " --teacher {input.teacher} --out {output.ckpt} --threads {threads} > {log} 2>&1"


rule train_ct:
    input:
        cfg=RESOLVED,
        data=DATA,
    output:
        ckpt=train_rule_io("ct")["output"],
        loss=train_loss_plot("ct"),
    log:
        train_rule_io("ct")["log"],
    benchmark:
        train_rule_io("ct")["benchmark"]
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("train"),
    params:
        cm=TRAIN_CM,
    shell:
        "{params.cm} train --method ct --config {input.cfg} --data {input.data}"
        " --out {output.ckpt}"
        " --threads {threads} > {log} 2>&1"


rule train_pd:
    input:
        cfg=RESOLVED,
        data=DATA,
        teacher=rules.train_teacher.output[0],
    output:
        ckpt=train_rule_io("pd")["output"],
        loss=train_loss_plot("pd"),
    log:
        train_rule_io("pd")["log"],
    benchmark:
        train_rule_io("pd")["benchmark"]
    priority: 1
    conda:
        ENV
    threads: CFG["threads"]
    resources:
        **res("train"),
    params:
        cm=TRAIN_CM,
    shell:
        "{params.cm} train --method pd --config {input.cfg} --data {input.data}"
        " --teacher {input.teacher} --out {output.ckpt} --threads {threads} > {log} 2>&1"


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
    conda:
        ENV
    resources:
        **res("light"),
    shell:
        "cm train --method untrained --config {input.cfg} --data {input.data} --out {output}"
        " > {log} 2>&1"
