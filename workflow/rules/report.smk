# Aggregation (every run pooled into study tables) and the rendered report.


rule aggregate:
    """Pool every run's metrics, complexity and training log (`deconver aggregate`)."""
    input:
        evaluation_files,
        complexity_records,
    output:
        str(AGGREGATE),
    log:
        logfile("aggregate", STUDY.study),
    params:
        study=str(STUDY_FILE),
    localrule: True
    shell:
        DECONVER + " aggregate --config {params.study} > {log} 2>&1"


rule report:
    """Tables (Markdown, LaTeX, CSV), figures, statistics and report.html (`deconver report`)."""
    input:
        str(AGGREGATE),
    output:
        str(REPORT),
    log:
        logfile("report", STUDY.study),
    params:
        study=str(STUDY_FILE),
    localrule: True
    shell:
        DECONVER + " report --config {params.study} > {log} 2>&1"
