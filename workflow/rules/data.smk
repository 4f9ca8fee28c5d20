# Data: synthetic stand-ins or a download when asked, then the preprocessing cache and the fold file.
# Priorities: data first, then training and what follows it (the critical path); complexity fills gaps.


# One `synth` rule per synthetic dataset (its output is the marker in that dataset's own root).
for _name, _root in ((n, Path(e.root)) for n, e in STUDY.datasets.items() if e.synthetic):

    rule:
        name:
            f"synth_{_name}"
        output:
            str(_root / SYNTH_MARKER),
        log:
            logfile("synth", _name),
        params:
            study=str(STUDY_FILE),
            dataset=_name,
        priority: 30
        localrule: True
        shell:
            DECONVER + " synth --config {params.study} --dataset {params.dataset} > {log} 2>&1"


# One `download` rule per dataset with `download: true` (MSD tasks through MONAI; needs a network).
for _name, _root in ((n, Path(e.root)) for n, e in STUDY.datasets.items() if e.download):

    rule:
        name:
            f"download_{_name}"
        output:
            str(_root / "dataset.json"),
        log:
            logfile("download", _name),
        params:
            root=str(_root),
        priority: 30
        localrule: True
        script:
            "../scripts/download_msd.py"


rule prepare:
    """Preprocess a dataset once into the on-disk cache (`deconver prepare`)."""
    priority: 30
    input:
        dataset_input,
    output:
        str(PATHS.manifest("{dataset}")),
    log:
        logfile("prepare", "{dataset}"),
    params:
        study=str(STUDY_FILE),
    threads: local_threads(4)
    resources:
        cpus_per_task=lambda wildcards, threads: threads,
        **RESOURCES["prepare"],
    shell:
        cli("prepare") + " > {log} 2>&1"


rule split:
    """The dataset's fold file, shared by every model (`deconver split`)."""
    priority: 30
    input:
        str(PATHS.manifest("{dataset}")),
    output:
        str(PATHS.split("{dataset}")),
    log:
        logfile("split", "{dataset}"),
    params:
        study=str(STUDY_FILE),
    localrule: True
    shell:
        cli("split") + " > {log} 2>&1"
