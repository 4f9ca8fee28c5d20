# The Deconver benchmark suite as a Snakemake workflow (docs/workflow.md).
#
#   snakemake --cores all                                   the embedded-default study (config/config.yaml)
#   snakemake --cores all --configfile config/paper.yaml    another study
#   snakemake --cores all --profile slurm ...               the same on a SLURM cluster (slurm/config.yaml)
#
# Orchestration only: every rule runs one `deconver <step> --config STUDY --dataset D [--model M]
# [--fold K]`; the package does the work, Snakemake the graph, scheduling and resumption.
# prepare → split → train → predict → evaluate, complexity → aggregate → report, over
# dataset × model × fold.

from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless --configfile names the study: a study file then stands alone
# (Snakemake would otherwise merge it into the default and mix the two studies' datasets).
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"


# Jobs an interrupted run left "incomplete" are redone by the next run instead of it refusing to
# start: profiles/default/config.yaml (Snakemake's workflow profile, read by every run of this
# Snakefile) sets rerun-incomplete. Safe here: every step writes its outputs atomically, and a
# training job that is redone resumes from its last checkpoint when its fingerprint matches.


wildcard_constraints:
    dataset=_alternatives(DATASETS),
    model=r"[A-Za-z0-9_.+-]+",
    fold=r"\d+",


localrules:
    all,


rule all:
    """The study's report (and everything it needs)."""
    input:
        final_targets,


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
