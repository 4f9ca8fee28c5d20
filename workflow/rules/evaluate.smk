# Evaluation (per-case metrics of a run) and complexity (per dataset × model).


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


rule complexity:
    """Parameters, FLOPs (two counters + the paper's convention), latency and memory (`deconver complexity`)."""
    output:
        str(PATHS.complexity("{dataset}", "{model}")),
    log:
        logfile("complexity", "{dataset}", "{model}"),
    params:
        study=str(STUDY_FILE),
        config=model_config,  # changed model kwargs or roi remeasure (common.smk)
    threads: local_threads(4)
    resources:
        cpus_per_task=lambda wildcards, threads: threads,
        **RESOURCES["complexity"],
    shell:
        cli("complexity", model=True) + " > {log} 2>&1"
