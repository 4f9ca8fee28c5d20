# Evaluation (per-case metrics of a run) and complexity (every dataset × model, one job).


rule evaluate:
    """Per-case, per-region metrics of a run's predictions (`deconver evaluate`)."""
    priority: 10
    input:
        predictions=str(PATHS.predictions("{dataset}", "{model}", "{fold}")),
        manifest=str(PATHS.manifest("{dataset}")),
    output:
        str(PATHS.evaluation("{dataset}", "{model}", "{fold}")),
    log:
        logfile("evaluate", "{dataset}", "{model}", "fold{fold}"),
    params:
        study=str(STUDY_FILE),
    threads: local_threads(4)  # cases in parallel, one process each
    resources:
        cpus_per_task=lambda wildcards, threads: threads,
        **RESOURCES["evaluate"],
    shell:
        cli("evaluate", model=True, fold=True) + " --workers {threads} > {log} 2>&1"


if STUDY.complexity.activate:

    rule complexity:
        """Parameters, FLOPs (two counters + the paper's convention), latency and memory of every (dataset,
        model) pair of the study (`deconver complexity --every-pair`) into R/complexity/<d>/<m>.json: one
        job, so one interpreter start (torch and MONAI imports, several seconds) instead of one per pair;
        a changed pair reruns them all."""
        priority: 15  # after the trainings have started, before predictions (data.smk)
        output:
            directory(str(PATHS.complexity_dir())),
        log:
            logfile("complexity", STUDY.study),
        params:
            study=str(STUDY_FILE),
            config=complexity_config,  # changed model kwargs or roi remeasure (common.smk)
        threads: local_threads(4)
        resources:
            cpus_per_task=lambda wildcards, threads: threads,
            **RESOURCES["complexity"],
        shell:
            DECONVER + " complexity --config {params.study} --every-pair > {log} 2>&1"
