# Data: synthetic stand-ins or a download when asked, then the preprocessing cache and the fold file.
# Priorities: data first (30), then training (20), the complexity job (15), predictions and evaluations
# (10): complexity starts once every training has started, instead of last (at priority 0 it ran alone at
# the end of the default study, 54 s of one core idle).


# One `synth` rule per synthetic dataset. The stand-in is written once into its root (studies may share
# it: another study, or the same with another seed, reuses it as it is); the rule's output is this
# study's copy of the root's marker, so Snakemake, which deletes a job's outputs before running it,
# never deletes the shared stand-in's own marker.
for _name, _root in ((n, Path(e.root)) for n, e in STUDY.datasets.items() if e.synthetic):

    rule:
        name:
            f"synth_{_name}"
        output:
            str(PATHS.synthetic_record(_name)),
        log:
            logfile("synth", _name),
        params:
            study=str(STUDY_FILE),
            dataset=_name,
            marker=str(_root / SYNTHETIC_MARKER),
        priority: 30
        localrule: True
        shell:
            DECONVER + " synth --config {params.study} --dataset {params.dataset} > {log} 2>&1"
            " && cp {params.marker} {output}"


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
