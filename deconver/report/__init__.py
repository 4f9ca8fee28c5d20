"""Aggregation and reporting: pooled tables, paired statistics, figures and the HTML report.

Steps: `deconver aggregate` (aggregate.py) pools every run's evaluation.csv, complexity JSON and
train_log.csv of a study into `<results>/<study>/aggregate/`; `deconver report` (render.py) turns that
into `reports/<study>/` (tables.py, stats.py, figures.py). See docs/report.md.
"""
