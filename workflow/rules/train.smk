# Training and prediction: one run per (dataset, model, fold).


rule train:
    """Train one run (`deconver train`). `final.ckpt` is written last; a resubmitted job resumes from
    `checkpoints/last.ckpt` (not an output, so Snakemake never deletes it)."""
    priority: 20
    input:
        manifest=str(PATHS.manifest("{dataset}")),
        split=str(PATHS.split("{dataset}")),
    output:
        str(PATHS.final_checkpoint("{dataset}", "{model}", "{fold}")),
    log:
        logfile("train", "{dataset}", "{model}", "fold{fold}"),
    params:
        study=str(STUDY_FILE),
        attempts=attempts_log(logfile("train", "{dataset}", "{model}", "fold{fold}")),
    # the study's trainer.threads, as in a hand run (`deconver train` sets torch to it): CPU results
    # depend on the thread count (docs/engine.md, "Determinism")
    threads: STUDY.trainer.threads
    resources:
        cpus_per_task=lambda wildcards, threads: threads,
        **RESOURCES["train"],
    shell:
        # {log} is this attempt (Snakemake empties it before each); {params.attempts} keeps every attempt
        "(echo \"== $(date -Is) train {wildcards.dataset} {wildcards.model} fold {wildcards.fold}\"; "
        + cli("train", model=True, fold=True, prefix=TRAIN_LAUNCHER)
        + ") 2>&1 | tee -a {params.attempts} > {log}"


rule predict:
    """Predict the fold's validation cases in the native grid (`deconver predict`)."""
    priority: 10
    input:
        ckpt=str(PATHS.final_checkpoint("{dataset}", "{model}", "{fold}")),
        split=str(PATHS.split("{dataset}")),
    output:
        directory(str(PATHS.predictions("{dataset}", "{model}", "{fold}"))),
    log:
        logfile("predict", "{dataset}", "{model}", "fold{fold}"),
    params:
        study=str(STUDY_FILE),
    threads: local_threads(4)
    resources:
        cpus_per_task=lambda wildcards, threads: threads,
        **RESOURCES["predict"],
    shell:
        cli("predict", model=True, fold=True) + " > {log} 2>&1"
